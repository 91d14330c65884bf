"""Warm starts (ExperimentSpec.warm_start): the registered model a run continues, as a
reference to its folder in the catalog's store that any worker can read, and what the run
records of it."""

from __future__ import annotations

from dataclasses import dataclass

from mlpaint.storage.catalog import BASE_MODELS, Catalog, local_folder
from mlpaint.tracking.publication import load_registered_model, version_with_alias
from mlpaint.tracking.registry import REGISTERED_MODEL_NAME
from mlpaint.tracking.store import tracking_client
from mlpaint.training.algorithms import (
    BaggedBoostingConfig,
    Continuation,
    DigitModel,
    GbdtConfig,
    ModelFormatError,
    continuation_problem,
)
from mlpaint.training.keys import base_model_key
from mlpaint.training.spec import ExperimentSpec, WarmStartSpec


@dataclass(frozen=True)
class WarmStartBase:
    """A registered version a run continues: where its model folder is stored, which version
    of which run it is, how many rounds it has and the "not sure" threshold it keeps."""

    location: str
    model_name: str
    version: str
    run_id: str
    alias: str
    rounds: int
    low_confidence_below: float

    def continuation(self, warm_start: WarmStartSpec) -> Continuation:
        return Continuation(DigitModel.load(local_folder(self.location)), warm_start.rounds,
                            warm_start.learning_rate)

    def describe(self) -> str:
        return (f"{self.model_name} version {self.version} (alias {self.alias!r}, run "
                f"{self.run_id}, {self.rounds} rounds)")

    def params(self) -> dict[str, str]:
        """The MLflow params that name the model a run continued."""
        return {"warm_start.base_version": self.version,
                "warm_start.base_run_id": self.run_id,
                "warm_start.base_rounds": str(self.rounds)}


def base_model_location(catalog: Catalog, run_id: str, version: str) -> str:
    """Where a registered version's model folder is kept in the store: a version of a run
    never changes, so its name is key enough."""
    return catalog.location(BASE_MODELS, base_model_key(run_id, version))


def store_base_model(catalog: Catalog, location: str, model: DigitModel) -> None:
    """`model` written whole at `location`, for every fit to read."""
    with catalog.staging(location) as staging:
        model.save(staging)
        catalog.finish(staging, location)


def resolve_base(spec: ExperimentSpec, config: GbdtConfig | BaggedBoostingConfig,
                 catalog: Catalog, tracking_uri: str) -> tuple[WarmStartBase | None, str]:
    """The registered version `spec.warm_start.alias` names, its model stored where every fit
    can read it (once per version), and a sentence saying what will continue; or None and
    why not, when no version holds the alias or the spec cannot continue it (the run then
    trains from nothing)."""
    alias = spec.warm_start.alias
    version = version_with_alias(tracking_client(tracking_uri), REGISTERED_MODEL_NAME, alias)
    if version is None:
        return None, (f"warm start: no version of {REGISTERED_MODEL_NAME} holds the alias "
                      f"{alias!r}; training {spec.algorithm} from nothing")
    location = base_model_location(catalog, version.run_id, str(version.version))
    try:
        if catalog.is_finished(location):
            model = DigitModel.load(local_folder(location))
        else:
            model = load_registered_model(REGISTERED_MODEL_NAME, str(version.version),
                                          tracking_uri)
            store_base_model(catalog, location, model)
    except ModelFormatError as exc:
        return None, f"warm start: {exc}; training {spec.algorithm} from nothing"
    base = WarmStartBase(location, REGISTERED_MODEL_NAME, str(version.version), version.run_id,
                         alias, sum(model.rounds), model.low_confidence_below)
    if problem := continuation_problem(model, config, spec.features):
        return None, (f"warm start: {base.describe()} cannot be continued by "
                      f"{spec.algorithm}: {problem}; training it from nothing")
    return base, (f"warm start: continuing {base.describe()} with {spec.warm_start.rounds} "
                  f"rounds of {spec.algorithm}; no folds train (it has seen their held-out "
                  "rows)")
