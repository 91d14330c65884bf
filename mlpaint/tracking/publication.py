"""The registry's side of publishing: which version to publish, the champion's version, the
model inside a version, and the gate's decision written back to the registry and the run."""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlpaint.publishing.bundle import BUNDLE_ROOT_TAG, BUNDLE_VERSION_TAG
from mlpaint.tracking.registry import REGISTERED_MODEL_NAME, RUN_INCOMPLETE, RUN_STATE_TAG
from mlpaint.tracking.store import tracking_client
from mlpaint.training.algorithms import MODEL_FORMAT_VERSION, DigitModel, ModelFormatError

CHAMPION = "champion"
CHALLENGER = "challenger"
GATE_TAG = "mlpaint.gate"


class IncompleteModelError(LookupError):
    """A version registered by an experiment that failed, crashed or was cancelled."""


@dataclass(frozen=True)
class CandidateRef:
    """The registered model version being published, and the data its run trained on."""

    name: str
    version: str
    run_id: str
    data_fingerprint: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def find_candidate(client, run_id: str | None, model_version: str | None) -> CandidateRef:
    """The version to publish: the one registered from `run_id`, the given version, or the
    newest version whose experiment finished. One whose experiment did not finish every
    fit is refused."""
    if model_version:
        version = client.get_model_version(REGISTERED_MODEL_NAME, str(model_version))
    else:
        query = f"name = '{REGISTERED_MODEL_NAME}'"
        if run_id:
            query += f" and run_id = '{run_id}'"
        versions = client.search_model_versions(query)
        if not run_id:  # the newest a finished experiment registered
            versions = [v for v in versions if v.tags.get(RUN_STATE_TAG) != RUN_INCOMPLETE]
        if not versions:
            raise LookupError(f"no registered version of {REGISTERED_MODEL_NAME}"
                              + (f" from run {run_id}" if run_id else ""))
        version = max(versions, key=lambda v: int(v.version))
    if version.tags.get(RUN_STATE_TAG) == RUN_INCOMPLETE:
        raise IncompleteModelError(
            f"{REGISTERED_MODEL_NAME} version {version.version}: its experiment (MLflow run "
            f"{version.run_id}) did not finish every fit, so it is never published")
    run = client.get_run(version.run_id)
    return CandidateRef(REGISTERED_MODEL_NAME, str(version.version), version.run_id,
                        run.data.tags.get("mlpaint.dataset_fingerprint", ""))


def version_with_alias(client, name: str, alias: str):
    """The version of `name` that holds `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def load_registered_model(name: str, version: str, tracking_uri: str) -> DigitModel:
    """The DigitModel inside a registered pixel-in pyfunc; its model.json says what it
    reads. Versions an older mlpaint registered (features in, stage kept in a tag) are
    refused by name rather than guessed at. Read through `tracking_uri`: MLflow's own
    `models:/` resolution would use the process-wide default instead."""
    import mlflow
    from mlflow.models import Model

    source = tracking_client(tracking_uri).get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory(prefix="registered-model-") as scratch:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=scratch,
                                                    tracking_uri=tracking_uri)
        # The MLmodel file itself: `get_model_info` would look the model up again through
        # the process-wide default store.
        found = (Model.load(local).metadata or {}).get("format_version")
        if found != MODEL_FORMAT_VERSION:
            raise ModelFormatError(f"models:/{name}/{version}: model format {found}, this "
                                   f"mlpaint reads {MODEL_FORMAT_VERSION}; train and register "
                                   "it again (to replace such a champion, publish with "
                                   "--force)")
        # The boosters are read into memory here; the folder can go.
        return mlflow.pyfunc.load_model(local).unwrap_python_model().model


def record_decision(client, candidate: CandidateRef, alias: str, reason: str,
                    decision: dict, destination: str, bundle_version: str,
                    explanations: Path) -> None:
    """The alias (a new champion stops being the challenger) and the bundle's tags on the
    version; the explanation images, the decision and the gate's tags in its run."""
    from mlflow.exceptions import MlflowException

    client.set_registered_model_alias(candidate.name, alias, candidate.version)
    if alias == CHAMPION:
        # A promoted model is no longer the challenger; having no challenger is the usual case.
        challenger = version_with_alias(client, candidate.name, CHALLENGER)
        if challenger is not None and str(challenger.version) == candidate.version:
            with contextlib.suppress(MlflowException):  # removed meanwhile: all the same
                client.delete_registered_model_alias(candidate.name, CHALLENGER)
    for key, value in {BUNDLE_ROOT_TAG: destination, BUNDLE_VERSION_TAG: bundle_version,
                       GATE_TAG: alias}.items():
        client.set_model_version_tag(candidate.name, candidate.version, key, value)
    for name in ("mean_contributions.png", "mean_abs_contributions.png",
                 "mean_contributions.npy", "mean_abs_contributions.npy"):
        client.log_artifact(candidate.run_id, str(explanations / name), "explanations")
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "gate_decision.json"
        report.write_text(json.dumps(decision, indent=1))
        client.log_artifact(candidate.run_id, str(report), "publish")
    client.set_tag(candidate.run_id, GATE_TAG, alias)
    client.set_tag(candidate.run_id, "mlpaint.gate_reason", reason)
