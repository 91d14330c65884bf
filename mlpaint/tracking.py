"""MLflow plumbing: where runs go, and the evaluation artifacts every run carries.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else a SQLite store in `.mlpaint/` under
the working directory, with artifacts beside it. Nothing is configured at import time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from mlpaint.locations import LOCAL_STORE_DIR
from mlpaint.training.evaluation import Evaluation

logger = logging.getLogger(__name__)

REGISTERED_MODEL_NAME = "mnist-digits"
# The MLflow UI opens an experiment of this kind on its training runs (not on GenAI traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# What loading the logged model needs, pinned to the versions that trained it. Given
# explicitly: MLflow would otherwise infer them by loading the model in a subprocess, seconds
# of work on every training run.
MODEL_PACKAGES = ("mlpaint", "mlflow", "lightgbm", "numpy", "pandas", "scipy", "scikit-image")


def resolve_tracking_uri() -> str:
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    folder = Path.cwd() / LOCAL_STORE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def tracking_client(tracking_uri: str):
    """An MlflowClient whose tracking store is also its model registry. A SQLite store is
    created or migrated under a lock first (see `prepare_sqlite_store`)."""
    from mlflow import MlflowClient

    if tracking_uri.startswith(SQLITE_PREFIX):
        prepare_sqlite_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


SQLITE_PREFIX = "sqlite:///"
_prepared_stores: set[str] = set()


def _sqlite_artifact_root(tracking_uri: str) -> str:
    """Artifacts of a SQLite store: an `artifacts/` folder beside the database."""
    return (Path(tracking_uri.removeprefix(SQLITE_PREFIX)).parent / "artifacts").resolve(
    ).as_uri()


def prepare_sqlite_store(tracking_uri: str) -> None:
    """Create or migrate a SQLite MLflow store, one process at a time.

    MLflow builds and migrates a SQLite store's schema when a process first opens it, with
    no lock: two runs started together on a new store both migrated it and left it half
    done (`table _alembic_tmp_experiments already exists`), for them and every later run.
    Here the first open happens under a file lock beside the database; whoever comes second
    finds the schema complete. Once per store per process."""
    if tracking_uri in _prepared_stores:
        return
    from filelock import FileLock
    from mlflow.store.model_registry.sqlalchemy_store import (
        SqlAlchemyStore as RegistryStore,
    )
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore
    from sqlalchemy.exc import SQLAlchemyError

    database = Path(tracking_uri.removeprefix(SQLITE_PREFIX))
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        _repair_interrupted_migration(database)
        try:
            # Opening the stores runs MLflow's schema creation and migrations.
            TrackingStore(tracking_uri, _sqlite_artifact_root(tracking_uri))
            RegistryStore(tracking_uri)
        except (SQLAlchemyError, sqlite3.Error) as exc:
            raise TrackingStoreError(
                f"{database}: MLflow could not open or upgrade this store ({exc}). Back the "
                f"file up, then run `mlflow db upgrade {tracking_uri}`, or move the file "
                "away to start a new store") from exc
    _prepared_stores.add(tracking_uri)


class TrackingStoreError(RuntimeError):
    """A local MLflow store that cannot be opened: the message says what to do."""


_ALEMBIC_TMP_PREFIX = "_alembic_tmp_"


def _repair_interrupted_migration(database: Path) -> list[str]:
    """Finish what an interrupted schema migration left, before MLflow migrates again.

    On SQLite, Alembic changes a table by copying it to `_alembic_tmp_<table>`, dropping the
    original and renaming the copy. A migration killed between the copy and the drop, or
    two run at once (older mlpaint, or MLflow without its own lock), leaves the copy beside
    an intact original, and every later open fails with `table _alembic_tmp_<table> already
    exists`. Such a copy holds nothing the original lacks: it is dropped, after a backup of
    the database beside it, and the migration then runs again. A copy whose original is gone
    is not guessed at: the error names the command that finishes it. Returns the tables
    repaired."""
    if not database.is_file():
        return []
    with contextlib.closing(sqlite3.connect(database)) as connection:
        tables = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        leftovers = sorted(t for t in tables if t.startswith(_ALEMBIC_TMP_PREFIX))
        if not leftovers:
            return []
        orphans = [t for t in leftovers if t.removeprefix(_ALEMBIC_TMP_PREFIX) not in tables]
        if orphans:
            commands = "; ".join(f"ALTER TABLE {t} RENAME TO "
                                 f"{t.removeprefix(_ALEMBIC_TMP_PREFIX)}" for t in orphans)
            raise TrackingStoreError(
                f"{database}: an interrupted MLflow migration left {', '.join(orphans)} "
                f"without its original table. Back the file up, then run "
                f"`sqlite3 {database} '{commands}'` and "
                f"`mlflow db upgrade {SQLITE_PREFIX}{database}`")
        backup = database.with_name(f"{database.name}.before-repair-{int(time.time())}")
        with contextlib.closing(sqlite3.connect(backup)) as copy:
            connection.backup(copy)
        for table in leftovers:
            connection.execute(f'DROP TABLE "{table}"')
        connection.commit()
    logger.warning("%s: dropped %s, left by an interrupted MLflow schema migration (backup "
                   "at %s); the migration runs again", database, ", ".join(leftovers), backup)
    return leftovers


def ensure_experiment(client, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it if needed. For the local SQLite store its artifacts go
    to `.mlpaint/artifacts`, not to an `mlruns/` folder wherever the command happened to run."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG,
                                      EXPERIMENT_KIND)
        return existing.experiment_id
    artifact_location = (_sqlite_artifact_root(tracking_uri)
                         if tracking_uri.startswith(SQLITE_PREFIX) else None)
    return client.create_experiment(name, artifact_location=artifact_location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


# On a registered version: whether the experiment that registered it finished every fit.
RUN_STATE_TAG = "mlpaint.run_state"
RUN_COMPLETE = "complete"
RUN_INCOMPLETE = "incomplete"
FLOW_RUN_TAG = "prefect.flow_run_id"
FLOW_RUN_URL_TAG = "prefect.flow_run_url"  # its page in the Prefect UI, when there is one


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    model_uri: str


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
    if earlier := _version_of_run(client, name, run_id):
        return earlier
    run = client.get_run(run_id)
    # Filtered here: the SQL store compares `status` with its stored number, not the name.
    ready = [logged for logged in client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = 'model'")
        if logged.status == LoggedModelStatus.READY]
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
    return RegisteredModel(name, str(registered.version), f"models:/{name}/{registered.version}")


def _version_of_run(client, name: str, run_id: str) -> RegisteredModel | None:
    """The version of `name` that `run_id` registered (its first, should there be more)."""
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'")
                if v.name == name]
    if not versions:
        return None
    first = min(versions, key=lambda v: int(v.version))
    return RegisteredModel(name, str(first.version), f"models:/{name}/{first.version}")


def _log_pyfunc(client, run, model_dir: Path, example_pixels: np.ndarray, card: dict):
    """The saved DigitModel logged under `run` as a READY logged model (FAILED if logging
    its files failed), and recorded as the run's output."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    from mlpaint.serving_model import DigitModelPyfunc, pixel_signature

    run_id = run.info.run_id
    logged = client.create_logged_model(run.info.experiment_id, name="model",
                                        source_run_id=run_id, model_type="digit-classifier")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / "model"
            mlflow.pyfunc.save_model(
                path=str(local), python_model=DigitModelPyfunc(),
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


def write_evaluation_artifacts(evaluation: Evaluation, folder: Path, title: str) -> list[Path]:
    """confusion_matrix.json (dense and MLDB's sparse form), label_statistics.csv, and a
    heatmap PNG with log-scaled colours, so the few off-diagonal errors stay visible."""
    folder.mkdir(parents=True, exist_ok=True)
    confusion_json = folder / "confusion_matrix.json"
    confusion_json.write_text(json.dumps({
        "rows_are": "actual", "columns_are": "predicted", "matrix": evaluation.confusion,
        "sparse": evaluation.sparse_confusion()}, indent=1))
    statistics_csv = folder / "label_statistics.csv"
    lines = ["label,accuracy,precision,recall,f1,support"]
    lines += [f"{s.label},{s.accuracy:.6f},{s.precision:.6f},{s.recall:.6f},{s.f1:.6f},"
              f"{s.support}" for s in evaluation.labels]
    weighted = evaluation.weighted
    lines.append(f"weighted,{weighted['accuracy']:.6f},{weighted['precision']:.6f},"
                 f"{weighted['recall']:.6f},{weighted['f1']:.6f},{evaluation.rows}")
    statistics_csv.write_text("\n".join(lines) + "\n")
    heatmap = render_confusion_heatmap(evaluation, folder / "confusion_matrix.png", title)
    return [confusion_json, statistics_csv, heatmap]


def render_confusion_heatmap(evaluation: Evaluation, destination: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    matrix = np.asarray(evaluation.confusion)
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    shown = np.ma.masked_equal(matrix, 0)
    image = axis.imshow(shown, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(matrix.max(), 2)))
    for actual in range(matrix.shape[0]):
        for predicted in range(matrix.shape[1]):
            if matrix[actual, predicted]:
                axis.text(predicted, actual, str(matrix[actual, predicted]), ha="center",
                          va="center", fontsize=7,
                          color="white" if actual != predicted else "black")
    axis.set_xlabel("predicted")
    axis.set_ylabel("actual")
    axis.set_xticks(range(matrix.shape[1]))
    axis.set_yticks(range(matrix.shape[0]))
    axis.set_title(f"{title}: accuracy {evaluation.accuracy:.4f} (log colour scale)")
    figure.colorbar(image, ax=axis, label="count")
    figure.tight_layout()
    figure.savefig(destination, dpi=90)
    plt.close(figure)
    return destination


def mark_complete(client, registered: RegisteredModel) -> None:
    """The experiment that registered this version finished every fit: it may be published."""
    client.set_model_version_tag(registered.name, registered.version, RUN_STATE_TAG,
                                 RUN_COMPLETE)


def end_open_runs(client, flow_run_id: str, status: str) -> list[str]:
    """End, with `status` (FAILED or KILLED), every MLflow run that the Prefect flow run
    `flow_run_id` started and left RUNNING, so the dashboard never shows a dead experiment
    as running or finished. Returns the runs it ended."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(
        experiments, filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}' "
                                   "and attributes.status = 'RUNNING'")
    for run in runs:
        client.set_terminated(run.info.run_id, status=status)
    return [run.info.run_id for run in runs]


@dataclass(frozen=True)
class DatasetUse:
    """One dataset a run read, as the MLflow dashboard lists it under the run's inputs."""

    name: str
    digest: str  # content hash: the same digest is the same data
    source: str  # where it came from (a URI or an origin description)
    rows: int
    context: str  # "training", "testing", "wild test"


def log_datasets(client, run_id: str, uses: list[DatasetUse]) -> None:
    """Record the datasets a run trained and was scored on (`mlflow.log_input`'s record,
    through the client), so the dashboard shows which data made which model."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client.log_inputs(run_id, datasets=[
        DatasetInput(Dataset(name=use.name, digest=use.digest[:36], source_type="mlpaint",
                             source=json.dumps({"uri": use.source}),
                             profile=json.dumps({"num_rows": use.rows})),
                     tags=[InputTag(MLFLOW_DATASET_CONTEXT, use.context)])
        for use in uses])


def _folder_megabytes(folder: Path) -> float:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):  # removed meanwhile by a concurrent run
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total / 1e6


def peak_rss_megabytes() -> float:
    """The largest resident memory of this process and of its finished children (Linux
    reports kilobytes)."""
    import resource

    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1e3


@contextlib.contextmanager
def recording_resources(tracking_uri: str, run_id: str, cache_dir: Path,
                        sampling_seconds: float = 10.0) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk and network under `system/`, sampled every
    `sampling_seconds` by a background thread) on `run_id` while the block runs; at its end,
    whatever the outcome, the process's peak memory and the size of the cache the run
    reads and fills (`resources/peak_rss_mb`, `resources/cache_mb`)."""
    from mlflow.entities import Metric
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_seconds,
                                   tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        try:
            now_ms = int(time.time() * 1000)
            tracking_client(tracking_uri).log_batch(run_id, metrics=[
                Metric("resources/peak_rss_mb", round(peak_rss_megabytes(), 1), now_ms, 0),
                Metric("resources/cache_mb", round(_folder_megabytes(cache_dir), 1), now_ms,
                       0)])
        except Exception:  # the run's outcome matters more than its resource figures
            logger.warning("could not log the resources of MLflow run %s", run_id,
                           exc_info=True)
