"""Named algorithms on LightGBM, and the model they produce.

`gbdt` trains one multiclass booster. `bagged_boosting` is the analogue of MLDB's bbdt_d5:
several bags, each a short boosting run whose round count is chosen on the bag's held-out
rows. A bagged model averages its bags' *raw scores* (then applies softmax) rather than their
probabilities: the average of additive tree models is still additive, so exact TreeSHAP
contributions of the ensemble are the average of each bag's, and the explanations the
serving step shows stay exact.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from mlpaint.data.catalog import N_CLASSES

MODEL_FORMAT_VERSION = 1


class GbdtConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["gbdt"] = "gbdt"
    description: str = ""
    rounds: int = Field(gt=0)
    params: dict[str, Any] = Field(default_factory=dict)


class BaggedBoostingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["bagged_boosting"] = "bagged_boosting"
    description: str = ""
    bags: int = Field(ge=1)
    bag_train_fraction: float = Field(gt=0, lt=1)
    min_rounds: int = Field(ge=1)
    max_rounds: int = Field(ge=1)
    params: dict[str, Any] = Field(default_factory=dict)


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


class DigitModel:
    """One or more LightGBM boosters whose raw scores are averaged."""

    def __init__(self, boosters: list, *, algorithm: str, rounds: list[int]) -> None:
        if not boosters:
            raise ValueError("a model needs at least one booster")
        self.boosters = boosters
        self.algorithm = algorithm
        self.rounds = rounds

    def raw_scores(self, features: np.ndarray, *, num_threads: int = 0) -> np.ndarray:
        """Mean raw score of the boosters. `num_threads=0` lets LightGBM use every core; a
        server answering many one-row requests at once passes 1, so concurrent requests do
        not each start a thread per core."""
        total = np.zeros((features.shape[0], N_CLASSES), dtype=np.float64)
        for booster in self.boosters:
            total += booster.predict(features, raw_score=True, num_threads=num_threads)
        return total / len(self.boosters)

    def predict_proba(self, features: np.ndarray, *, num_threads: int = 0) -> np.ndarray:
        return softmax(self.raw_scores(features, num_threads=num_threads))

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for index, booster in enumerate(self.boosters):
            name = f"booster-{index}.txt"
            booster.save_model(str(folder / name))
            names.append(name)
        (folder / "model.json").write_text(json.dumps({
            "format_version": MODEL_FORMAT_VERSION, "algorithm": self.algorithm,
            "boosters": names, "rounds": self.rounds, "combine": "mean_raw_score"}, indent=2))
        return folder

    @classmethod
    def load(cls, folder: Path) -> DigitModel:
        import lightgbm as lgb

        meta = json.loads((folder / "model.json").read_text())
        boosters = [lgb.Booster(model_file=str(folder / name)) for name in meta["boosters"]]
        return cls(boosters, algorithm=meta["algorithm"], rounds=meta["rounds"])


def train_model(name: str, config: GbdtConfig | BaggedBoostingConfig, features: np.ndarray,
                labels: np.ndarray, *, seed: int, num_threads: int) -> DigitModel:
    import lightgbm as lgb

    params = lightgbm_params(config.params, seed=seed, num_threads=num_threads)
    if isinstance(config, GbdtConfig):
        booster = lgb.train(params, lgb.Dataset(features, labels, params=params),
                            num_boost_round=config.rounds)
        return DigitModel([booster], algorithm=name, rounds=[config.rounds])

    rng = np.random.default_rng(seed)
    boosters, rounds = [], []
    for bag in range(config.bags):
        order = rng.permutation(len(labels))
        cut = round(config.bag_train_fraction * len(labels))
        train_rows, held_out = np.sort(order[:cut]), np.sort(order[cut:])
        bag_params = {**params, "seed": seed + bag}
        train_set = lgb.Dataset(features[train_rows], labels[train_rows], params=bag_params)
        valid_set = lgb.Dataset(features[held_out], labels[held_out], reference=train_set)
        history: dict = {}
        booster = lgb.train(bag_params, train_set, num_boost_round=config.max_rounds,
                            valid_sets=[valid_set], valid_names=["held_out"],
                            callbacks=[lgb.record_evaluation(history)])
        losses = np.asarray(history["held_out"]["multi_logloss"])
        # The best round on the held-out rows, but never fewer than min_rounds.
        best = config.min_rounds + int(np.argmin(losses[config.min_rounds - 1:]))
        boosters.append(lgb.Booster(model_str=booster.model_to_string(num_iteration=best)))
        rounds.append(best)
    return DigitModel(boosters, algorithm=name, rounds=rounds)
