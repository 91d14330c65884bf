"""The API's contract: the request and response models, as /openapi.json publishes them.

A schema-driven fuzzer (tests/integration/test_openapi_contract.py) holds the app to this
document, so what a field accepts is said here, in the schema, and nowhere else.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from mlpaint.data.pins import N_CLASSES, N_FEATURES

MAX_BODY_BYTES = 1 << 20
MAX_BATCH = 256

Status = Literal["ok", "low_confidence", "nothing_drawn"]
STATUS_DESCRIPTION = ("'ok'; 'low_confidence' when the top probability is below the served "
                      "model's threshold (`low_confidence_below` on /v1/model; see "
                      "`candidates`); 'nothing_drawn' for a blank drawing, a dot or a faint "
                      "smudge, with no digit, probabilities or explanations")


def _json_integer(value: object) -> object:
    """JSON Schema's "integer", which the OpenAPI document promises: a whole number, `6` or
    `6.0`; not `true` (pydantic's lax mode read it as 1) and not the string "6"."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a whole number")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number")
        return int(value)
    return value


# Strict: a JSON `true` or "7" is not a pixel value (lax parsing read them as 1 and 7, which
# the schema's "number" does not allow); a whole number still is.
Pixel = Annotated[float, Field(strict=True, ge=0, le=255, allow_inf_nan=False)]
Digit = Annotated[int, Field(ge=0, le=N_CLASSES - 1), BeforeValidator(_json_integer)]
PixelList = Annotated[list[Pixel], Field(min_length=N_FEATURES, max_length=N_FEATURES)]


def _no_default(schema: dict) -> None:
    """An optional field of a `oneOf` body has no default worth showing: null is not a value
    it takes."""
    schema.pop("default", None)


def _exactly_one_of(model: BaseModel, names: tuple[str, ...]) -> None:
    """The rule the schema states with `oneOf` (see `_one_of_schema`), enforced."""
    for name in names:
        if name in model.model_fields_set and getattr(model, name) is None:
            raise ValueError(f"'{name}' may not be null: leave it out")
    if sum(getattr(model, name) is not None for name in names) != 1:
        raise ValueError("give exactly one of " + ", ".join(f"'{n}'" for n in names))


#: An image as a base64 data URL: `data:image/<type>[;parameters];base64,<base64>`, the
#: payload whole base64 (groups of four, padded) and not empty.
DATA_URL_PATTERN = (r"^data:image/[-+.\w]+(;[-\w]+=[-\w]+)*;base64,"
                    r"(?:(?:[A-Za-z0-9+/]{4})+(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
                    r"|[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)$")


def _one_of_schema(*names: str) -> dict:
    """JSON Schema for "exactly one of these fields": a body naming two matches two branches
    of `oneOf` and is invalid, as is one naming none; clients and fuzzers read it from
    /openapi.json."""
    return {"oneOf": [{"required": [name]} for name in names]}


class DigitInput(BaseModel):
    """One digit: either 784 pixel values (28x28, row by row, 0-255, ink high as in MNIST),
    or a drawing as a PNG/JPEG data URL of any size (dark ink on a light or transparent
    background), which is cropped, scaled and centred like MNIST first. Exactly one."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_of_schema("pixels", "image"))
    pixels: SkipJsonSchema[None] | PixelList = Field(None, json_schema_extra=_no_default)
    # The data-URL rule is the schema's, so a client (or a fuzzer) reading /openapi.json
    # knows that an empty or non-base64 string is refused; only bytes that do not decode as
    # an image are left for the 400 the schema cannot express.
    image: SkipJsonSchema[None] | Annotated[str, StringConstraints(
        pattern=DATA_URL_PATTERN)] = Field(None, description="data:image/png;base64,…",
                                           json_schema_extra=_no_default)

    @model_validator(mode="after")
    def _exactly_one(self) -> DigitInput:
        _exactly_one_of(self, ("pixels", "image"))
        return self


class PredictRequest(DigitInput):
    """One digit (`pixels` or `image`) or a `batch` of them: exactly one of the three."""

    model_config = ConfigDict(extra="forbid",
                              json_schema_extra=_one_of_schema("pixels", "image", "batch"))
    batch: SkipJsonSchema[None] | Annotated[list[DigitInput], Field(
        min_length=1, max_length=MAX_BATCH)] = Field(None, json_schema_extra=_no_default)

    @model_validator(mode="after")
    def _exactly_one(self) -> PredictRequest:
        _exactly_one_of(self, ("pixels", "image", "batch"))
        return self


class ExplainRequest(DigitInput):
    labels: list[Digit] | Literal["all"] | None = Field(
        None, description="digits to explain: a list, 'all', or omitted for the top three")


class Prediction(BaseModel):
    status: Status = Field(description=STATUS_DESCRIPTION)
    digit: int | None
    candidates: list[int] = Field(description="the two most probable digits, best first")
    probabilities: list[float] | None
    raw_scores: list[float] | None
    model_version: str
    bundle_version: str


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class LabelExplanation(BaseModel):
    label: int
    probability: float
    raw_score: float
    bias: float
    contributions: list[float] = Field(description="784 values, row by row, 28x28")


class ExplainResponse(BaseModel):
    status: Status = Field(description=STATUS_DESCRIPTION)
    digit: int | None
    candidates: list[int] = Field(description="the two most probable digits, best first")
    probabilities: list[float] | None
    image: list[int] = Field(description="the preprocessed 28x28 input, row by row, 0-255")
    features: list[float] = Field(description="what the model saw (after its feature stage), "
                                              "which the contributions refer to")
    explanations: list[LabelExplanation]
    model_version: str
    bundle_version: str


class ExampleResponse(BaseModel):
    digit: int
    offset: int
    count: int
    row_key: str
    predicted: int
    image: list[int]
    features: list[float]
    probabilities: list[float]
    raw_scores: list[float]
    contributions: list[list[float]] = Field(description="10 x 784")
    bias: list[float]


class FeedbackRequest(DigitInput):
    """A person's label for a drawing: the same `image` (or `pixels`) the app was shown."""

    label: Digit = Field(description="the digit the person drew")
    digit: Digit | None = Field(None, description="the digit the app answered, if it did")
    bundle_version: str | None = Field(None, max_length=80, pattern=r"^[\w.:@-]+$",
                                       description="the bundle that answered")


class FeedbackResponse(BaseModel):
    id: str = Field(description="the record's id: the same drawing with the same label "
                                "always has the same id")
    created: bool = Field(description="false when this drawing with this label was already "
                                      "stored; the first record is kept")
    label: int


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong and what to fix")


class ReadyResponse(BaseModel):
    ready: bool
    bundle_version: str | None = None
    last_refresh_error: str | None = None
    error: str | None = None


def error_responses(*codes: int) -> dict[int | str, dict]:
    """The documented error answers of an endpoint, for /openapi.json."""
    described = {
        400: "a body that keeps the schema but whose drawing cannot be used: an `image` that "
             "does not decode as an image, or (feedback) nothing drawn",
        404: "nothing there (the endpoint says what)",
        413: f"a request body over {MAX_BODY_BYTES} bytes",
        429: "too many requests from this address; see Retry-After",
        503: "no model loaded yet"}
    return {code: {"model": ErrorResponse, "description": described[code]} for code in codes}


class ModelResponse(BaseModel):
    model_name: str
    model_version: str
    bundle_version: str
    alias: str | None
    algorithm: str
    feature_stage: str
    metrics: dict[str, float]
    data_fingerprint: dict[str, str]
    trained_at: str
    gallery_per_digit: int
    low_confidence_below: float = Field(description=(
        "answers whose top probability is below this are 'low_confidence': the model's own "
        "threshold, chosen when it was trained on drawings by writers it did not train on"))
