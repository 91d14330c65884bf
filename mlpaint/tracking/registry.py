"""The model registry: a trained DigitModel logged as a pixel-in pyfunc (from code, no pickle)
and registered as `mnist-digits`, once per run, with its completeness marked."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

REGISTERED_MODEL_NAME = "mnist-digits"
# What loading the logged model needs, pinned to the versions that trained it. Given
# explicitly: MLflow would otherwise infer them by loading the model in a subprocess, seconds
# of work on every training run.
MODEL_PACKAGES = ("mlpaint", "mlflow", "lightgbm", "numpy", "pandas", "scipy", "scikit-image")
# On a registered version: whether the experiment that registered it finished every fit.
RUN_STATE_TAG = "mlpaint.run_state"
RUN_COMPLETE = "complete"
RUN_INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    model_uri: str
    # The logged model the version was registered from: metrics logged against it show on
    # MLflow's model pages, where versions are compared.
    model_id: str | None = None


def _pinned_requirements(packages: tuple[str, ...]) -> list[str]:
    pinned = []
    for package in packages:
        try:
            pinned.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pinned


def log_digit_model(client, run_id: str, model_dir: Path, example_pixels: np.ndarray,
                    *, name: str = REGISTERED_MODEL_NAME, complete: bool = True
                    ) -> RegisteredModel:
    """Log a saved DigitModel as a pixel-in pyfunc under `run_id` and register it as `name`.

    Everything goes through `client`: no process-wide tracking URI, and no `start_run`
    whose exit would end the run (the parent run of an experiment stays open while its
    folds still train). The model's own model.json travels inside it as its meaning, and
    the same card is the MLmodel metadata. `complete=False` registers it as part of a run
    still going (RUN_STATE_TAG incomplete): publishing refuses it until `mark_complete`.

    One version per run: a retry after a failure halfway (the tracking server went away
    after the version was created, or after the model was logged) returns the version this
    run already registered, or registers the model it already logged, instead of a second
    version that would make the registry disagree with what the run reports."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    from mlpaint.training.algorithms import DigitModel

    card = DigitModel.load(model_dir).card()
    run = client.get_run(run_id)
    # Filtered here: the SQL store compares `status` with its stored number, not the name.
    ready = [logged for logged in client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = 'model'")
        if logged.status == LoggedModelStatus.READY]
    if earlier := _version_of_run(client, name, run_id, ready):
        return earlier
    logged = ready[0] if ready else _log_pyfunc(client, run, model_dir, example_pixels, card)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # The artifact location, not `models:/<model id>`: MLflow's SQL registry resolves the
    # latter through the process-wide tracking URI rather than this client's.
    registered = client.create_model_version(
        name, source=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
        tags={"mlflow_run_id": run_id,
              RUN_STATE_TAG: RUN_COMPLETE if complete else RUN_INCOMPLETE},
        description=f"{card['algorithm']} on {card['feature_stage']} features. "
                    f"Input: {card['input']}. Output: probabilities of 0..9.")
    return RegisteredModel(name, str(registered.version), f"models:/{name}/{registered.version}",
                           logged.model_id)


def _version_of_run(client, name: str, run_id: str, logged_models: list
                    ) -> RegisteredModel | None:
    """The version of `name` that `run_id` registered (its first, should there be more), with
    the id of the model among `logged_models` it was registered from: the SQL registry keeps
    a version's source, not its model id."""
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'")
                if v.name == name]
    if not versions:
        return None
    first = min(versions, key=lambda v: int(v.version))
    model_id = next((logged.model_id for logged in logged_models
                     if logged.artifact_location == first.source), None)
    return RegisteredModel(name, str(first.version), f"models:/{name}/{first.version}",
                           model_id)


def _log_pyfunc(client, run, model_dir: Path, example_pixels: np.ndarray, card: dict):
    """The saved DigitModel logged under `run` as a READY logged model (FAILED if logging
    its files failed), and recorded as the run's output."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    from mlpaint.tracking.pyfunc import MODEL_CODE, pixel_signature

    run_id = run.info.run_id
    logged = client.create_logged_model(run.info.experiment_id, name="model",
                                        source_run_id=run_id, model_type="digit-classifier")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / "model"
            mlflow.pyfunc.save_model(
                path=str(local), python_model=str(MODEL_CODE),
                artifacts={"digit_model": str(model_dir)}, signature=pixel_signature(),
                input_example=np.asarray(example_pixels, dtype=np.float32), metadata=card,
                pip_requirements=_pinned_requirements(MODEL_PACKAGES),
                mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id,
                                   model_uuid=logged.model_id, model_id=logged.model_id))
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    logged = client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged


def mark_complete(client, registered: RegisteredModel) -> None:
    """The experiment that registered this version finished every fit: it may be published."""
    client.set_model_version_tag(registered.name, registered.version, RUN_STATE_TAG,
                                 RUN_COMPLETE)
