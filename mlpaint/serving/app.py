"""The MLPaint ASGI app: the REST API and the drawing page.

Every input is validated by pydantic (visible on /docs); anything wrong with a request is a
4xx saying what to fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from limits import parse as parse_rate
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlpaint.data.catalog import IMAGE_SIDE, N_CLASSES, N_FEATURES
from mlpaint.feedback import FeedbackRecord, FeedbackStore
from mlpaint.preprocess import ink_from_image, something_drawn, to_mnist
from mlpaint.serving.events import FeedbackAnnouncer
from mlpaint.serving.model import ALL_LABELS, ModelHolder, ServedModel, top_labels

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
# A person labels a drawing every few seconds at most; a client far above that is a script.
DEFAULT_FEEDBACK_RATE = "30/minute"
MAX_BATCH = 256
MAX_IMAGE_SIDE = 4096
# Below this probability for the winning digit an answer is marked `low_confidence` and the
# page names the two candidates: the model is then torn, most often between two digits that
# share strokes (4/9, 3/5, 1/7), and saying so beats a confident-looking wrong answer.
# bench/robustness.py reports how often answers below and above it are right.
LOW_CONFIDENCE = 0.6

Status = Literal["ok", "low_confidence", "nothing_drawn"]
STATUS_DESCRIPTION = ("'ok'; 'low_confidence' when the top probability is below "
                      f"{LOW_CONFIDENCE} (see `candidates`); 'nothing_drawn' for a blank drawing, "
                      "a dot or a faint smudge, with no digit, probabilities or explanations")

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
    image: SkipJsonSchema[None] | str = Field(None, description="data:image/png;base64,…",
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


def _errors(*codes: int) -> dict[int | str, dict]:
    """The documented error answers of an endpoint, for /openapi.json."""
    described = {
        400: "a body that keeps the schema but whose drawing cannot be used: an `image` that "
             "is not a data URL or does not decode as an image, or (feedback) nothing drawn",
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


def _drawing_bytes(data_url: str) -> tuple[str, bytes]:
    """(media type, bytes) of an image data URL, as the client sent it."""
    header, sep, payload = data_url.partition(",")
    if not sep or not header.startswith("data:image/") or ";base64" not in header:
        raise HTTPException(400, "image must be a data URL: data:image/png;base64,<data>")
    try:
        return header[len("data:"):].split(";", 1)[0], base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(400, f"image is not valid base64: {exc}") from exc


def _digit_of_drawing(raw: bytes) -> tuple[np.ndarray, bool]:
    """The 28x28 digit of an encoded drawing, and whether anything was drawn."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            if max(image.size) > MAX_IMAGE_SIDE:
                raise HTTPException(400, f"image larger than {MAX_IMAGE_SIDE} px a side")
            image.load()
            ink = ink_from_image(image)
            return to_mnist(ink), something_drawn(ink)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise HTTPException(400, "image could not be decoded as PNG, JPEG or another format "
                                 "Pillow reads") from exc


def _decode_image(data_url: str) -> tuple[np.ndarray, bool]:
    return _digit_of_drawing(_drawing_bytes(data_url)[1])


def _pixels_of(item: DigitInput) -> tuple[np.ndarray, bool]:
    """The 784 MNIST-like pixels of one input, and whether anything was drawn."""
    if item.pixels is not None:
        pixels = np.rint(np.asarray(item.pixels, dtype=np.float64)).astype(np.uint8)
        return pixels, something_drawn(pixels.reshape(IMAGE_SIDE, IMAGE_SIDE) / 255.0)
    digit, drawn = _decode_image(item.image)
    return digit.reshape(N_FEATURES), drawn


async def _pixels_of_all(items: list[DigitInput]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, 784) uint8 and a bool per row: was anything drawn. Decoding a drawing can take
    tens of milliseconds, so images are decoded on a worker thread; pixel lists,
    microseconds of work, stay on the event loop."""
    def decode_all() -> tuple[np.ndarray, np.ndarray]:
        decoded = [_pixels_of(item) for item in items]
        return (np.stack([pixels for pixels, _ in decoded]),
                np.array([drawn for _, drawn in decoded]))

    if all(item.image is None for item in items):
        return decode_all()
    return await run_in_threadpool(decode_all)


def _confidence(probabilities: np.ndarray) -> Status:
    """The status of an answer to a drawing that holds something."""
    return "low_confidence" if probabilities.max() < LOW_CONFIDENCE else "ok"


class BodySizeLimit:
    """Answers 413 to a request body over `max_bytes`, before anything parses it.

    Plain ASGI rather than `@app.middleware("http")`: that wrapper runs every request through
    an extra task and memory streams, a measurable share of a sub-millisecond request."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._too_large(scope, receive, send)
            else:  # the server holds the body to its declared length
                await self.app(scope, receive, send)
            return
        if scope["method"] not in {"POST", "PUT", "PATCH"}:
            await self.app(scope, receive, send)
            return
        # Chunked: no declared length, so measure what actually comes, then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return body

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, 413)(
            scope, receive, send)


def create_app(bundle_uri: str, *, cache_dir: Path | None = None,
               watch_interval_s: float = 5.0, feedback_store: str | None = None,
               feedback_rate: str = DEFAULT_FEEDBACK_RATE) -> FastAPI:
    """The app. `feedback_store` is where `/v1/feedback` appends (None: the endpoint answers
    404); `feedback_rate` is how many posts one client address may make, as `limits` writes
    it ("20/minute"), counted in each server process."""
    holder = ModelHolder(bundle_uri, cache_dir=cache_dir)
    feedback = FeedbackStore.at(feedback_store) if feedback_store else None
    rate = parse_rate(feedback_rate)
    limiter = MovingWindowRateLimiter(MemoryStorage())
    announcer = FeedbackAnnouncer(feedback.describe()) if feedback else None

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        holder.load_initial()
        if announcer is not None:
            announcer.start()
        if watch_interval_s > 0:
            holder.watch(watch_interval_s)
        yield
        holder.stop()

    app = FastAPI(title="MLPaint", version="1", lifespan=lifespan,
                  description="Scores and exact per-pixel explanations of handwritten digits.")
    app.state.holder = holder

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each bad input back, and a NaN cannot be written as JSON
        # (it would turn a 422 into a 500): say where and what, not the value.
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""),
             "type": error.get("type", "")} for error in exc.errors()]})

    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)

    def served() -> ServedModel:
        current = holder.current
        if current is None:
            raise HTTPException(503, "no model loaded yet")
        return current

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyResponse, responses={
        503: {"model": ReadyResponse, "description": "no model loaded (yet, or it failed)"}})
    def readyz() -> JSONResponse:
        current = holder.current
        if current is None:
            return JSONResponse({"ready": False, "error": holder.last_error}, 503)
        return JSONResponse({"ready": True, "bundle_version": current.version,
                             "last_refresh_error": holder.last_error})

    @app.get("/v1/model", response_model=ModelResponse, responses=_errors(503))
    def model_info() -> ModelResponse:
        current = served()
        info = current.bundle.info
        return ModelResponse(
            model_name=info.model_name, model_version=info.model_version,
            bundle_version=info.version, alias="champion" if "@champion" in bundle_uri
            else None, algorithm=info.algorithm,
            feature_stage=current.model.feature_stage.value,
            metrics=info.metrics, data_fingerprint=info.data_fingerprint,
            trained_at=info.created_at, gallery_per_digit=int(info.gallery.get("per_digit", 0)))

    # Scoring and explaining one digit take a millisecond or two of CPU. They run on the event
    # loop (`async def`), one request after another in each worker process: handing each to a
    # thread, as FastAPI does for plain `def`, made concurrent requests fight over the GIL,
    # which cost more than the work and stretched the tail latency (bench/serve.py). The
    # largest unit of work, a batch of 256 digits, takes about 25 ms.
    @app.post("/v1/predict", response_model=PredictResponse, responses=_errors(400, 413, 503))
    async def predict(request: PredictRequest) -> PredictResponse:
        current = served()
        items = request.batch if request.batch is not None else [request]
        pixels, drawn = await _pixels_of_all(items)
        raw, probabilities = current.score(current.features(pixels))
        info = current.bundle.info
        predictions = []
        for r, p, was_drawn in zip(raw, probabilities, drawn, strict=True):
            if was_drawn:
                predictions.append(Prediction(
                    status=_confidence(p), digit=int(p.argmax()), candidates=top_labels(p, 2),
                    probabilities=p.tolist(), raw_scores=r.tolist(),
                    model_version=info.model_version, bundle_version=info.version))
            else:
                predictions.append(Prediction(
                    status="nothing_drawn", digit=None, candidates=[], probabilities=None,
                    raw_scores=None, model_version=info.model_version,
                    bundle_version=info.version))
        return PredictResponse(predictions=predictions)

    @app.post("/v1/explain", response_model=ExplainResponse, responses=_errors(400, 413, 503))
    async def explain(request: ExplainRequest) -> ExplainResponse:
        current = served()
        all_pixels, drawn = await _pixels_of_all([request])
        pixels = all_pixels[0]
        info = current.bundle.info
        if not drawn[0]:
            return ExplainResponse(
                status="nothing_drawn", digit=None, candidates=[], probabilities=None,
                image=pixels.tolist(), features=[], explanations=[],
                model_version=info.model_version, bundle_version=info.version)
        features = current.features(pixels[None, :])[0]  # once: scores and contributions
        raw, probabilities = current.score(features[None, :])
        raw, probabilities = raw[0], probabilities[0]
        if request.labels == "all":
            labels = ALL_LABELS
        elif request.labels is None:
            labels = top_labels(probabilities, 3)
        else:
            labels = list(dict.fromkeys(request.labels))
        contrib = current.explain(features, labels)
        return ExplainResponse(
            status=_confidence(probabilities), digit=int(probabilities.argmax()),
            candidates=top_labels(probabilities, 2), probabilities=probabilities.tolist(),
            image=pixels.tolist(), features=features.tolist(),
            explanations=[LabelExplanation(label=label, probability=float(probabilities[label]),
                                           raw_score=float(raw[label]),
                                           bias=float(contrib[i, -1]),
                                           contributions=contrib[i, :-1].tolist())
                          for i, label in enumerate(labels)],
            model_version=info.model_version, bundle_version=info.version)

    @app.get("/v1/examples", response_model=ExampleResponse, responses=_errors(404, 503))
    def examples(digit: Annotated[int, Query(ge=0, le=N_CLASSES - 1)],
                 offset: Annotated[int, Query(ge=0)] = 0) -> ExampleResponse:
        current = served()
        count = current.gallery_count(digit)
        if offset >= count:
            raise HTTPException(404, f"offset {offset} is past the gallery: digit {digit} has "
                                     f"{count} examples (offsets 0..{count - 1})")
        row = current.gallery_row(digit, offset)
        g = current.gallery
        contributions = g["contributions"][row]
        return ExampleResponse(
            digit=digit, offset=offset, count=count, row_key=str(g["row_key"][row]),
            predicted=int(g["raw_scores"][row].argmax()), image=g["pixels"][row].tolist(),
            features=g["features"][row].tolist(),
            probabilities=g["probabilities"][row].tolist(),
            raw_scores=g["raw_scores"][row].tolist(),
            contributions=contributions[:, :-1].tolist(), bias=contributions[:, -1].tolist())

    @app.post("/v1/feedback", response_model=FeedbackResponse, status_code=201, responses={
        200: {"model": FeedbackResponse, "description": "already stored"},
        **_errors(400, 404, 413, 429, 503)})
    async def post_feedback(body: FeedbackRequest, request: Request,
                            response: Response) -> FeedbackResponse:
        if feedback is None:
            raise HTTPException(404, "feedback is off on this server (--feedback-store off)")
        client = request.client.host if request.client else "unknown"
        if not limiter.hit(rate, client):
            wait_s = limiter.get_window_stats(rate, client).reset_time - time.time()
            raise HTTPException(429, f"too many feedback posts from this address: at most "
                                     f"{feedback_rate}",
                                headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
        current = holder.current

        def store() -> tuple[FeedbackRecord, bool]:
            # Decoding a drawing and writing to the store (a file, or a PUT to S3) both take
            # milliseconds: a worker thread, not the event loop.
            media_type = drawing = None
            if body.image is not None:  # kept as received, so decoded here, not in _pixels_of
                media_type, drawing = _drawing_bytes(body.image)
                pixels, drawn = _digit_of_drawing(drawing)
            else:
                pixels, drawn = _pixels_of(body)
            if not drawn:
                # 400, like an undecodable image: the body keeps the schema (422 is for
                # bodies that break it), but its drawing cannot be used.
                raise HTTPException(400, "nothing drawn: draw a digit before labelling it")
            answered_by = body.bundle_version or (current.version if current else None)
            model_version = (current.bundle.info.model_version
                             if current and current.version == answered_by else None)
            record = FeedbackRecord.new(
                label=body.label, pixels=pixels.reshape(-1), drawing=drawing,
                drawing_media_type=media_type, answered_digit=body.digit,
                bundle_version=answered_by, model_version=model_version)
            return record, feedback.add(record)

        record, created = await run_in_threadpool(store)
        if created:
            announcer.announce(record)
        else:
            response.status_code = 200
        return FeedbackResponse(id=record.id, created=created, label=record.label)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("mlpaint.serving").joinpath("static/index.html").read_text()

    return app


class ServeSettings(BaseSettings):
    """What each server process needs to build the app. `mlpaint serve` writes these to the
    environment, because with several workers uvicorn starts fresh processes that import
    the app by name rather than receive the object."""

    model_config = SettingsConfigDict(env_prefix="MLPAINT_SERVE_", extra="ignore")
    bundle: str
    cache_dir: Path | None = None
    watch_seconds: float = Field(5.0, ge=0)
    feedback_store: str | None = None  # None: feedback off
    feedback_rate: str = DEFAULT_FEEDBACK_RATE

    def to_environment(self) -> dict[str, str]:
        return {f"MLPAINT_SERVE_{name.upper()}": str(value)
                for name, value in self.model_dump().items() if value is not None}


def app_from_environment() -> FastAPI:
    """The app factory uvicorn calls in each worker process."""
    settings = ServeSettings()
    return create_app(settings.bundle, cache_dir=settings.cache_dir,
                      watch_interval_s=settings.watch_seconds,
                      feedback_store=settings.feedback_store,
                      feedback_rate=settings.feedback_rate)

