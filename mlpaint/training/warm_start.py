"""Warm starts (ExperimentSpec.warm_start): the registered model a run continues, as a
reference to its folder in the catalog's store that any worker can read, and what the run
records of it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mlpaint.catalog import BASE_MODELS, Catalog, local_folder
from mlpaint.training.algorithms import Continuation, DigitModel
from mlpaint.training.spec import WarmStartSpec


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
    key = hashlib.sha256(f"{run_id}/{version}".encode()).hexdigest()[:32]
    return catalog.location(BASE_MODELS, key)


def store_base_model(catalog: Catalog, location: str, model: DigitModel) -> None:
    """`model` written whole at `location`, for every fit to read."""
    with catalog.staging(location) as staging:
        model.save(staging)
        catalog.finish(staging, location)
