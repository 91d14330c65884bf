"""Named algorithms on LightGBM, and the model they produce.

`gbdt` trains one multiclass booster. `bagged_boosting` is the analogue of MLDB's bbdt_d5:
several bags, each a short boosting run whose round count is chosen on the bag's held-out
rows. A bagged model averages its bags' *raw scores* (then turns them into probabilities)
rather than their probabilities: the average of additive tree models is still additive, so
exact TreeSHAP contributions of the ensemble are the average of each bag's, and the
explanations the serving step shows stay exact.

Either trains LightGBM's `multiclass` objective (one softmax over ten scores) or its
`multiclassova` (one binary model per digit, each score that digit's log-odds against the
rest). Both are ten additive scores per row, explained the same way; only the step from
scores to probabilities (`ScoreLink`) differs, and the model card records it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from mlpaint.data.pins import N_CLASSES, as_images
from mlpaint.model.features import FeatureStage, apply_feature_stage
from mlpaint.training.confidence import DEFAULT_LOW_CONFIDENCE_BELOW
from mlpaint.training.progress import WATCHED_METRICS, FitMonitor

# 2: model.json also says what the model reads (its feature stage, its input) and what it
# answers (its labels), so a model folder is the one document of its meaning.
MODEL_FORMAT_VERSION = 2
MODEL_CARD = "model.json"
LABELS = list(range(N_CLASSES))
COMBINE = "mean_raw_score"
# What `predict_pixels` takes, in words, for the MLflow signature and model card.
PIXEL_INPUT = ("pixels: rows of 784 values, a 28x28 image row by row, 0 = background and "
               "255 = full ink (MNIST's convention)")


class ScoreLink(StrEnum):
    """How a model's ten raw scores become the probabilities of the ten digits."""

    SOFTMAX = "softmax"  # `multiclass`: the scores are a softmax's logits
    # `multiclassova`: each score is one digit's log-odds against the rest; the ten sigmoids
    # are scaled to sum to 1, as scikit-learn's one-vs-rest classifier does.
    NORMALISED_SIGMOID = "normalised_sigmoid"


# LightGBM's names (and aliases) of the objectives mlpaint trains, and their links.
_OBJECTIVE_LINKS = {"multiclass": ScoreLink.SOFTMAX, "softmax": ScoreLink.SOFTMAX,
                    "multiclassova": ScoreLink.NORMALISED_SIGMOID,
                    "multiclass_ova": ScoreLink.NORMALISED_SIGMOID,
                    "ova": ScoreLink.NORMALISED_SIGMOID, "ovr": ScoreLink.NORMALISED_SIGMOID}


def link_for_params(params: dict[str, Any]) -> ScoreLink:
    """The link of the objective LightGBM parameters name (`multiclass` when they name none)."""
    objective = params.get("objective", "multiclass")
    if objective not in _OBJECTIVE_LINKS:
        raise ValueError(f"objective {objective!r}: mlpaint trains digit models with "
                         f"{sorted(_OBJECTIVE_LINKS)}")
    return _OBJECTIVE_LINKS[objective]


def probabilities(scores: np.ndarray, link: ScoreLink | str) -> np.ndarray:
    """(rows, 10) raw scores as probabilities that sum to 1 per row."""
    if ScoreLink(link) is ScoreLink.SOFTMAX:
        return softmax(scores)
    # Sigmoids scaled to sum to 1 are the softmax of their logarithms, log sigmoid(s) =
    # -log(1 + e^-s): computed so, no row of very negative scores divides 0 by 0.
    return softmax(-np.logaddexp(0.0, -scores))


class _ParamsChecked(BaseModel):
    @field_validator("params", check_fields=False)
    @classmethod
    def _known_objective(cls, params: dict[str, Any]) -> dict[str, Any]:
        link_for_params(params)  # refused when the file is read, not after a long fit
        return params


class GbdtConfig(_ParamsChecked):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["gbdt"] = "gbdt"
    description: str = ""
    rounds: int = Field(gt=0)
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def total_rounds(self) -> int:
        return self.rounds


class BaggedBoostingConfig(_ParamsChecked):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["bagged_boosting"] = "bagged_boosting"
    description: str = ""
    bags: int = Field(ge=1)
    bag_train_fraction: float = Field(gt=0, lt=1)
    min_rounds: int = Field(ge=1)
    max_rounds: int = Field(ge=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def total_rounds(self) -> int:
        """Every bag's rounds: each trains `max_rounds`, then keeps its best."""
        return self.bags * self.max_rounds


AlgorithmConfig = Annotated[GbdtConfig | BaggedBoostingConfig, Field(discriminator="kind")]
_CATALOG = TypeAdapter(dict[str, AlgorithmConfig])


def load_algorithms(path: Path | None = None) -> dict[str, GbdtConfig | BaggedBoostingConfig]:
    """The named configurations: the packaged `algorithms.yaml`, or the user's file."""
    text = (path.read_text() if path
            else resources.files("mlpaint.configs").joinpath("algorithms.yaml").read_text())
    return _CATALOG.validate_python(yaml.safe_load(text))


def lightgbm_params(params: dict[str, Any], *, seed: int, num_threads: int) -> dict[str, Any]:
    """LightGBM parameters for a multiclass digit model: ours first, the config's on top."""
    return {"objective": "multiclass", "num_class": N_CLASSES, "verbosity": -1,
            "seed": seed, "deterministic": True, "force_col_wise": True,
            "num_threads": num_threads, **params}


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class ModelFormatError(ValueError):
    """A model folder this version of mlpaint cannot read for sure."""


class DigitModel:
    """One or more LightGBM boosters whose raw scores are averaged, and the feature stage
    that turns pixels into what they read: the model is not complete without it. Its
    answers whose top probability is below `low_confidence_below` are marked "not sure"
    (mlpaint.training.confidence)."""

    def __init__(self, boosters: list, *, algorithm: str, rounds: list[int],
                 feature_stage: FeatureStage | str,
                 link: ScoreLink | str = ScoreLink.SOFTMAX,
                 low_confidence_below: float = DEFAULT_LOW_CONFIDENCE_BELOW) -> None:
        if not boosters:
            raise ValueError("a model needs at least one booster")
        self.boosters = boosters
        self.algorithm = algorithm
        self.rounds = rounds
        self.feature_stage = FeatureStage(feature_stage)
        self.link = ScoreLink(link)
        self.low_confidence_below = float(low_confidence_below)

    def raw_scores(self, features: np.ndarray, *, num_threads: int = 0) -> np.ndarray:
        """Mean raw score of the boosters. `num_threads=0` lets LightGBM use every core; a
        server answering many one-row requests at once passes 1, so concurrent requests do
        not each start a thread per core."""
        total = np.zeros((features.shape[0], N_CLASSES), dtype=np.float64)
        for booster in self.boosters:
            total += booster.predict(features, raw_score=True, num_threads=num_threads)
        return total / len(self.boosters)

    def predict_proba(self, features: np.ndarray, *, num_threads: int = 0) -> np.ndarray:
        return self.probabilities(self.raw_scores(features, num_threads=num_threads))

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """Raw scores (see `raw_scores`) as probabilities, through the model's link."""
        return probabilities(scores, self.link)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels (see PIXEL_INPUT; N x 784 or N x 28 x 28) through the model's own stage."""
        images = as_images(pixels)
        if images.dtype != np.uint8:
            values = np.asarray(images, dtype=np.float64)
            if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(
                    initial=0) > 255:
                raise ValueError("pixels must lie in 0..255 (0 background, 255 full ink)")
            images = np.rint(values).astype(np.uint8)
        return apply_feature_stage(self.feature_stage, images)

    def predict_pixels(self, pixels: np.ndarray, *, num_threads: int = 0) -> np.ndarray:
        """(rows, 10) probabilities of the digits 0..9 for raw pixel rows."""
        return self.predict_proba(self.features(pixels), num_threads=num_threads)

    def card(self) -> dict:
        return {"format_version": MODEL_FORMAT_VERSION, "algorithm": self.algorithm,
                "feature_stage": self.feature_stage.value, "input": PIXEL_INPUT,
                "labels": LABELS, "combine": COMBINE, "link": self.link.value,
                "rounds": self.rounds, "low_confidence_below": self.low_confidence_below}

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for index, booster in enumerate(self.boosters):
            name = f"booster-{index}.txt"
            booster.save_model(str(folder / name))
            names.append(name)
        (folder / MODEL_CARD).write_text(json.dumps({**self.card(), "boosters": names},
                                                    indent=2))
        return folder

    @staticmethod
    def record_low_confidence_below(folder: Path, threshold: float) -> None:
        """Set the threshold on the card of the model saved in `folder`, its boosters left
        as they are."""
        card = json.loads((folder / MODEL_CARD).read_text())
        (folder / MODEL_CARD).write_text(json.dumps(
            {**card, "low_confidence_below": float(threshold)}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> DigitModel:
        import lightgbm as lgb

        card = json.loads((folder / MODEL_CARD).read_text())
        if card.get("format_version") != MODEL_FORMAT_VERSION:
            raise ModelFormatError(
                f"{folder / MODEL_CARD}: model format {card.get('format_version')}, this "
                f"mlpaint reads {MODEL_FORMAT_VERSION} (format 1 did not record the feature "
                "stage; train the model again)")
        if card["labels"] != LABELS or card["combine"] != COMBINE:
            raise ModelFormatError(f"{folder / MODEL_CARD}: labels {card['labels']} combined "
                                   f"by {card['combine']!r} are not what mlpaint serves")
        boosters = [lgb.Booster(model_file=str(folder / name)) for name in card["boosters"]]
        # Cards written before `link` was recorded are all `multiclass` models; those
        # written before a threshold was chosen per model used the default.
        return cls(boosters, algorithm=card["algorithm"], rounds=card["rounds"],
                   feature_stage=card["feature_stage"],
                   link=card.get("link", ScoreLink.SOFTMAX),
                   low_confidence_below=card.get("low_confidence_below",
                                                 DEFAULT_LOW_CONFIDENCE_BELOW))


@dataclass(frozen=True)
class Continuation:
    """A model whose boosting a fit continues (ExperimentSpec.warm_start): its trees are
    kept, and `rounds` more are fitted to the new rows' errors given its scores, at
    `learning_rate` (None: the configuration's)."""

    model: DigitModel
    rounds: int
    learning_rate: float | None = None


def continuation_problem(model: DigitModel, config: GbdtConfig | BaggedBoostingConfig,
                         feature_stage: FeatureStage | str) -> str | None:
    """Why `config` on `feature_stage` cannot continue `model`'s boosting, or None when it
    can: its trees must read the same features and answer through the same link, and one
    booster can grow where the average of several bags cannot."""
    if not isinstance(config, GbdtConfig):
        return f"the configuration is {config.kind}; only a gbdt configuration continues a model"
    if len(model.boosters) != 1:
        return (f"it averages {len(model.boosters)} boosters (bagged boosting); only a single "
                "booster can be continued")
    if model.feature_stage != FeatureStage(feature_stage):
        return (f"it reads the {model.feature_stage.value} feature stage, the spec "
                f"{FeatureStage(feature_stage).value}")
    if model.link != link_for_params(config.params):
        return (f"its scores are {model.link.value}, the configuration's "
                f"{link_for_params(config.params).value}")
    return None


def train_model(name: str, config: GbdtConfig | BaggedBoostingConfig, features: np.ndarray,
                labels: np.ndarray, *, feature_stage: FeatureStage | str, seed: int,
                num_threads: int, weights: np.ndarray | None = None,
                monitor: FitMonitor | None = None,
                watched_rows: tuple[np.ndarray, np.ndarray] | None = None,
                continuation: Continuation | None = None) -> DigitModel:
    """Train on `features` (pixels already through `feature_stage`, which the model keeps),
    each row counting `weights[i]` times (None: once). `monitor` is told of each round; a
    gbdt fit scores `watched_rows` (features, labels) as it trains, for the monitor, and a
    bagged one each bag's own held-out rows. Given a `continuation`, a gbdt fit grows that
    model (its trees, then `continuation.rounds` more) and keeps its "not sure" threshold."""
    import lightgbm as lgb

    params = lightgbm_params(config.params, seed=seed, num_threads=num_threads)
    link = link_for_params(params)
    callbacks = [monitor] if monitor is not None else []
    if continuation is not None and (
            problem := continuation_problem(continuation.model, config, feature_stage)):
        raise ValueError(f"cannot continue the model: {problem}")
    if isinstance(config, GbdtConfig):
        rounds, init_booster, rounds_before = config.rounds, None, 0
        if continuation is not None:
            init_booster = continuation.model.boosters[0]
            rounds, rounds_before = continuation.rounds, init_booster.current_iteration()
            if continuation.learning_rate is not None:
                params = {**params, "learning_rate": continuation.learning_rate}
            if monitor is not None:
                # LightGBM numbers the new rounds after the base model's.
                monitor.start_stage(-rounds_before)
        train_set = lgb.Dataset(features, labels, weight=weights, params=params)
        valid_sets = []
        if monitor is not None and watched_rows is not None:
            params = {**params, "metric": WATCHED_METRICS}
            valid_sets = [lgb.Dataset(*watched_rows, reference=train_set)]
        # With an init model, LightGBM starts every row (the watched ones too) from its
        # scores and merges its trees into the booster it returns.
        booster = lgb.train(params, train_set, num_boost_round=rounds,
                            valid_sets=valid_sets, valid_names=["watched"][:len(valid_sets)],
                            callbacks=callbacks, init_model=init_booster)
        return DigitModel([booster], algorithm=name, rounds=[rounds_before + rounds],
                          feature_stage=feature_stage, link=link,
                          low_confidence_below=continuation.model.low_confidence_below
                          if continuation else DEFAULT_LOW_CONFIDENCE_BELOW)

    rng = np.random.default_rng(seed)
    boosters, rounds = [], []
    for bag in range(config.bags):
        order = rng.permutation(len(labels))
        cut = round(config.bag_train_fraction * len(labels))
        train_rows, held_out = np.sort(order[:cut]), np.sort(order[cut:])
        bag_params = {**params, "seed": seed + bag, "metric": WATCHED_METRICS}
        train_set = lgb.Dataset(features[train_rows], labels[train_rows], params=bag_params,
                                weight=None if weights is None else weights[train_rows])
        valid_set = lgb.Dataset(features[held_out], labels[held_out], reference=train_set,
                                weight=None if weights is None else weights[held_out])
        history: dict = {}
        if monitor is not None:
            monitor.start_stage(bag * config.max_rounds)
        booster = lgb.train(bag_params, train_set, num_boost_round=config.max_rounds,
                            valid_sets=[valid_set], valid_names=["held_out"],
                            callbacks=[lgb.record_evaluation(history), *callbacks])
        losses = np.asarray(history["held_out"]["multi_logloss"])
        # The best round on the held-out rows, but never fewer than min_rounds.
        best = config.min_rounds + int(np.argmin(losses[config.min_rounds - 1:]))
        boosters.append(lgb.Booster(model_str=booster.model_to_string(num_iteration=best)))
        rounds.append(best)
    return DigitModel(boosters, algorithm=name, rounds=rounds, feature_stage=feature_stage,
                      link=link)
