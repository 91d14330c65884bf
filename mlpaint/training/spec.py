"""The experiment specification: a typed, validated configuration.

Loaded from YAML (the packaged default, a packaged spec by name, or a user's file) with
command-line options or a deployment's changes applied; a flow run trains the spec it is given,
whole.

Everything wrong with a spec — an unknown algorithm, a fold rule that selects nothing, k < 2 —
is reported before any data is read or any model trained, naming the field.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlpaint.images.augment import AugmentSpec
from mlpaint.images.drawing import PenStyle
from mlpaint.model.feature_stages import FeatureStage

_RULE = re.compile(r"^\s*rowHash\(\)\s*%\s*(\d+)\s*(==|=|!=|<>|<=|>=|<|>)\s*(\d+)\s*$",
                   re.IGNORECASE)
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq, "==": operator.eq, "!=": operator.ne, "<>": operator.ne,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


class SpecError(ValueError):
    """An invalid experiment specification; the message names the field."""


@dataclass(frozen=True)
class RowHashRule:
    """MLDB's `rowHash() % M <op> V`, evaluated on our stable 64-bit row hashes."""

    modulus: int
    op: str
    value: int

    @classmethod
    def parse(cls, text: str, field: str) -> RowHashRule:
        match = _RULE.match(text)
        if not match:
            raise SpecError(f"{field}: {text!r} is not of the form 'rowHash() % M <op> V' "
                            "(op one of = != < <= > >=)")
        modulus, op, value = int(match[1]), match[2], int(match[3])
        if modulus < 2:
            raise SpecError(f"{field}: the modulus must be at least 2, got {modulus}")
        rule = cls(modulus, op, value)
        if not rule.residues():
            raise SpecError(f"{field}: {text!r} selects no rows (no residue modulo "
                            f"{modulus} satisfies it)")
        return rule

    def residues(self) -> frozenset[int]:
        compare = _OPS[self.op]
        return frozenset(r for r in range(self.modulus) if compare(r, self.value))

    def mask(self, row_hash: np.ndarray) -> np.ndarray:
        return _OPS[self.op](row_hash % np.uint64(self.modulus), np.uint64(self.value))


class MldbFolds(BaseModel):
    """One fold split by row-hash rules, as in MLDB's `trainingWhere` / `testingWhere`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["mldb"] = "mldb"
    training_where: str = "rowHash() % 5 != 0"
    testing_where: str = "rowHash() % 5 = 0"

    def rules(self) -> tuple[RowHashRule, RowHashRule]:
        return (RowHashRule.parse(self.training_where, "folds.training_where"),
                RowHashRule.parse(self.testing_where, "folds.testing_where"))


class KFolds(BaseModel):
    """k folds: fold i tests on rows with row_hash % k == i and trains on the rest."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["kfold"] = "kfold"
    k: int

    @field_validator("k")
    @classmethod
    def _at_least_two(cls, k: int) -> int:
        if k < 2:
            raise ValueError(f"k must be at least 2, got {k}")
        return k


FoldSpec = Annotated[MldbFolds | KFolds, Field(discriminator="kind")]


class FeedbackSpec(BaseModel):
    """Drawings people labelled on the page (mlpaint.feedback.store), added to training."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    store: str | None = Field(None, description="a feedback store: a folder or "
                                                "s3://bucket/prefix; none: MNIST alone")
    weight: float = Field(1.0, gt=0, le=100, description="how many MNIST rows one feedback "
                                                         "record counts as in training")
    wild_share: float = Field(0.2, gt=0, lt=1, description="the share of records, chosen by "
                              "row hash, kept out of training as the wild test set")


class PenSpec(BaseModel):
    """Digits people drew with a stylus (UCI's pen-based digits: mlpaint.data.pendigits),
    drawn as the page draws them (mlpaint.images.drawing) and added to training. The writers of
    `test_share` of them are the drawn test set: every model is scored on it, none trains
    on it, in any fold or the final fit."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: list[str] | None = Field(
        None, description="UNIPEN files tried in order: s3://…, https://…, a path, or "
                          "archive.zip#member (default: UCI's download, then the copy mlpaint "
                          "ships)")
    renderings: int = Field(2, ge=0, le=16, description="renderings of each training "
                            "writer's digit, each with its own pen, size, place and tilt (0: "
                            "none trains; the drawn test set is still scored)")
    weight: float = Field(1.0, gt=0, le=100, description="how many MNIST rows one rendering "
                                                         "counts as in training")
    test_share: float = Field(0.2, gt=0, lt=1, description="the share of writers, chosen by "
                              "a hash of the writer, kept out of training as the drawn test "
                              "set")
    style: PenStyle = Field(default_factory=PenStyle)

    @field_validator("sources")
    @classmethod
    def _sources_have_transports(cls, sources: list[str] | None) -> list[str] | None:
        from mlpaint.data.transports import transport_for

        for uri in sources or []:
            transport_for(uri.partition("#")[0])  # raises ValueError naming the scheme
        return sources


class WarmStartSpec(BaseModel):
    """Continue a registered model's boosting instead of starting from nothing: the version
    of mnist-digits holding `alias` keeps every tree it has and gains `rounds` more, fitted
    to this spec's rows (MNIST, its augmented copies, the pen drawings and the feedback). It
    costs those rounds, not a whole fit, so corrections people make can reach the server the
    same hour. No folds train: the base model has seen every held-out row they would score
    on. Where no version holds the alias, or it cannot be continued (another feature stage,
    bagged boosters), the spec trains from nothing and the run says why."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alias: str | None = Field(None, description="continue the mnist-digits version holding "
                              "this registry alias (for instance champion); none: train from "
                              "nothing")
    rounds: int = Field(60, ge=1, le=5000, description="boosting rounds added to it")
    learning_rate: float | None = Field(None, gt=0, le=1, description="their learning rate "
                                        "(none: the algorithm's)")


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: str = Field("mnist-digits", min_length=1)
    algorithm: str = "lgbm"
    features: FeatureStage = FeatureStage.MOMENTS
    folds: FoldSpec | None = Field(default_factory=MldbFolds, description="the cross-fold "
                                   "split (none: the final model alone, no folds)")
    eval_train: bool = False
    sources: list[str] | None = None
    limit: int | None = Field(None, ge=100)
    seed: int = 0
    final_fit: bool = True
    # The defaults, nested sections' included, are the packaged default spec's (experiment.yaml;
    # a test holds them equal): a run form fills every field it has no value for from them.
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    feedback: FeedbackSpec = Field(default_factory=FeedbackSpec)
    pen: PenSpec = Field(default_factory=PenSpec)
    warm_start: WarmStartSpec = Field(default_factory=WarmStartSpec)
    low_confidence_below: float | None = Field(
        None, ge=0.5, lt=1, description="the \"not sure\" threshold of a model trained from "
        "nothing without folds to choose one on (none: 0.6); folds choose their own")

    def flat_params(self) -> dict[str, str]:
        """The whole spec as flat `a.b` keys, for MLflow params."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping):
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), inner)
            else:
                flat[prefix] = "null" if value is None else str(value)

        walk("", self.model_dump(mode="json"))
        return flat


def field_problems(error: ValidationError) -> str:
    """A validation error as one line naming each bad field: `limit: Input should be …`."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}"
                     for e in error.errors())


def parse_folds_option(value: str) -> MldbFolds | KFolds | None:
    """`mldb`, an integer k or `none` (no folds), as `--folds` takes it."""
    if value.strip().lower() == "none":
        return None
    if value.strip().lower() == "mldb":
        return MldbFolds()
    try:
        return KFolds(k=int(value))
    except ValueError as exc:
        raise SpecError(f"folds: expected 'mldb', an integer k >= 2 or 'none', got "
                        f"{value!r}") from exc


def default_spec_text() -> str:
    return resources.files("mlpaint.configs").joinpath("experiment.yaml").read_text()


PACKAGED_SPECS = {"default": "experiment.yaml", "champion": "champion.yaml"}


def spec_text(path_or_name: str | Path | None) -> str:
    """The text of a spec: the packaged default for None, a packaged spec by its name
    (`default`, `champion`), or a YAML file."""
    if path_or_name is None:
        return default_spec_text()
    if str(path_or_name) in PACKAGED_SPECS:
        return resources.files("mlpaint.configs").joinpath(
            PACKAGED_SPECS[str(path_or_name)]).read_text()
    path = Path(path_or_name)
    if not path.is_file():
        raise SpecError(f"spec: {str(path)!r} is neither a file nor a packaged spec "
                        f"({', '.join(PACKAGED_SPECS)})")
    return path.read_text()


def _merged(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied, section by section; a fold rule is taken whole, since
    its fields mean nothing without its kind."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict) and key != "folds":
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_spec(path: Path | str | None = None, overrides: Mapping[str, Any] | None = None,
              *, changes: Mapping[str, Any] | None = None,
              known_algorithms: frozenset[str] | None = None) -> ExperimentSpec:
    """Read a spec (the packaged default when `path` is None, a packaged spec by name, or a
    file), apply overrides whose value is not None (command-line flags) and `changes`
    (section by section, None included), validate it, and check every rule and the
    algorithm name."""
    text = spec_text(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"{path or 'default spec'}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{path or 'default spec'}: expected a mapping of fields")
    data = _merged(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    data = _merged(data, changes or {})
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(field_problems(exc)) from exc
    return check_spec(spec, known_algorithms)


def check_spec(spec: ExperimentSpec, known_algorithms: frozenset[str] | None = None
               ) -> ExperimentSpec:
    """`spec`, once its fold rules parse and select rows and its algorithm is one of
    `known_algorithms`: the checks a field's type cannot make. Raises SpecError naming the
    field."""
    if isinstance(spec.folds, MldbFolds):
        spec.folds.rules()  # raises SpecError naming the rule's field
    if spec.folds is None and not spec.final_fit:
        raise SpecError("folds: none and final_fit: false leave nothing to train")
    if spec.warm_start.alias and not spec.final_fit:
        raise SpecError(f"warm_start.alias: {spec.warm_start.alias!r} asks to continue a "
                        "model, which trains the final model alone, but final_fit is false")
    if known_algorithms is not None and spec.algorithm not in known_algorithms:
        raise SpecError(f"algorithm: unknown {spec.algorithm!r}; known: "
                        f"{', '.join(sorted(known_algorithms))}")
    return spec


@dataclass(frozen=True)
class FoldPlan:
    index: int
    train_rows: np.ndarray  # row positions in the training table
    test_rows: np.ndarray


def fold_sides(folds: MldbFolds | KFolds, row_hash: np.ndarray) -> list[FoldPlan]:
    """Row positions per fold by the fold rule alone; a side may be empty (as the pen rows
    of a few writers may leave one)."""
    if isinstance(folds, MldbFolds):
        train_rule, test_rule = folds.rules()
        return [FoldPlan(0, np.flatnonzero(train_rule.mask(row_hash)),
                         np.flatnonzero(test_rule.mask(row_hash)))]
    residue = row_hash % np.uint64(folds.k)
    return [FoldPlan(i, np.flatnonzero(residue != np.uint64(i)),
                     np.flatnonzero(residue == np.uint64(i))) for i in range(folds.k)]


def plan_folds(folds: MldbFolds | KFolds | None, row_hash: np.ndarray) -> list[FoldPlan]:
    """Row positions per fold (none without folds); a side left empty by the data is an
    error naming the fold."""
    plans = fold_sides(folds, row_hash) if folds is not None else []
    for plan in plans:
        for side, rows in (("training", plan.train_rows), ("testing", plan.test_rows)):
            if rows.size == 0:
                raise SpecError(f"folds: fold {plan.index} has no {side} rows "
                                f"among {row_hash.size}")
    return plans
