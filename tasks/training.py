"""Prefect tasks for training experiments.

Compute tasks (features, fits) take and return file references and carry no retries: a fit
that failed will fail again. Tasks that talk to the MLflow tracking store retry, since that
is I/O that can fail and is safe to repeat.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from prefect import task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.logging import get_run_logger

from mlpaint.augment import AUGMENT_CODE_VERSION, AugmentSpec, augment
from mlpaint.data.catalog import N_CLASSES
from mlpaint.data.dataset import load_table
from mlpaint.data.explore import render_label_grid
from mlpaint.features import FeatureStage, apply_feature_stage
from mlpaint.feedback import FeedbackSnapshot, FeedbackStore, wild_rows
from mlpaint.locations import place_in_cache
from mlpaint.tracking import (
    FLOW_RUN_TAG,
    FLOW_RUN_URL_TAG,
    DatasetUse,
    RegisteredModel,
    end_open_runs,
    ensure_experiment,
    log_datasets,
    log_digit_model,
    mark_complete,
    tracking_client,
    write_evaluation_artifacts,
)
from mlpaint.training.algorithms import BaggedBoostingConfig, GbdtConfig
from mlpaint.training.evaluation import Evaluation
from mlpaint.training.fits import ExperimentSummary, FitResult, fit_final, fit_fold
from mlpaint.training.matrices import AugmentedMatrix, FeatureMatrix, FeedbackMatrix
from mlpaint.training.spec import ExperimentSpec, FeedbackSpec
from tasks.artifacts import create_png_artifact
from tasks.retries import SERVICE_CALL_RETRIES


@task(name="prepare-features")
def prepare_features(table_dir: str, stage: FeatureStage, limit: int | None,
                     cache_dir: Path) -> FeatureMatrix:
    """Apply the feature stage to a split (its first `limit` rows), cached by table, stage
    and limit."""
    table_path = Path(table_dir)
    key = f"{table_path.parent.name}-{table_path.name}-{stage.value}-{limit or 'all'}"
    folder = cache_dir / "features" / key
    table = load_table(table_path)
    rows = min(limit, table.meta.rows) if limit else table.meta.rows
    if (folder / "features.npy").is_file():
        return FeatureMatrix(str(folder), rows, stage.value)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written beside its final place and renamed: a killed run leaves no half-written matrix.
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    np.save(staging / "features.npy", apply_feature_stage(stage, table.pixels[:rows]))
    np.save(staging / "labels.npy", np.asarray(table.labels[:rows]))
    np.save(staging / "row_hash.npy", np.asarray(table.row_hash[:rows]))
    place_in_cache(staging, folder, marker="features.npy")
    get_run_logger().info("%s features of %d %s rows in %s", stage.value, rows,
                          table.meta.split, folder)
    return FeatureMatrix(str(folder), rows, stage.value)


def _augmented_key(table_path: Path, stage: FeatureStage, limit: int | None,
                   augment_spec: AugmentSpec, seed: int) -> str:
    material = json.dumps({"table": f"{table_path.parent.name}/{table_path.name}",
                           "stage": stage.value, "limit": limit, "seed": seed,
                           "augment": augment_spec.model_dump(mode="json"),
                           "code": AUGMENT_CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


@task(name="prepare-augmented-rows")
def prepare_augmented(table_dir: str, stage: FeatureStage, limit: int | None,
                      augment_spec: AugmentSpec, seed: int, cache_dir: Path) -> AugmentedMatrix:
    """Augmented copies of a split's (first `limit`) rows through the feature stage, cached
    by the table, the stage, the augmentation spec, the seed and the code's version."""
    table_path = Path(table_dir)
    key = _augmented_key(table_path, stage, limit, augment_spec, seed)
    folder = cache_dir / "augmented" / key
    table = load_table(table_path)
    rows = min(limit, table.meta.rows) if limit else table.meta.rows
    if (folder / "features.npy").is_file():
        return AugmentedMatrix(str(folder), rows * augment_spec.copies)
    logger = get_run_logger()
    start = time.perf_counter()
    pixels, source = augment(np.asarray(table.pixels[:rows]), augment_spec, seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    np.save(staging / "features.npy", apply_feature_stage(stage, pixels))
    np.save(staging / "labels.npy", np.asarray(table.labels[:rows])[source])
    np.save(staging / "source_row.npy", source)
    place_in_cache(staging, folder, marker="features.npy")
    logger.info("%d augmented copies of %d %s rows in %.1f s, in %s", augment_spec.copies,
                rows, table.meta.split, time.perf_counter() - start, folder)
    return AugmentedMatrix(str(folder), len(source))


@task(name="prepare-feedback", **SERVICE_CALL_RETRIES)
def prepare_feedback(feedback_spec: FeedbackSpec, stage: FeatureStage,
                     augment_spec: AugmentSpec, seed: int, cache_dir: Path) -> FeedbackMatrix:
    """Snapshot the feedback store's accepted records, split off the wild test set by row
    hash, augment the rest as MNIST's rows are, and apply the feature stage; cached by the
    snapshot's content and everything else that shapes the result."""
    logger = get_run_logger()
    snapshot = FeedbackSnapshot.of(FeedbackStore.at(feedback_spec.store))
    wild = wild_rows(snapshot.row_hash, feedback_spec.wild_share)
    material = json.dumps({"digest": snapshot.digest, "stage": stage.value, "seed": seed,
                           "wild_share": feedback_spec.wild_share,
                           "augment": augment_spec.model_dump(mode="json"),
                           "code": AUGMENT_CODE_VERSION}, sort_keys=True)
    key = hashlib.sha256(material.encode()).hexdigest()[:32]
    folder = cache_dir / "feedback" / key
    train_pixels, train_labels = snapshot.pixels[~wild], snapshot.labels[~wild]
    copies = augment_spec.copies if len(train_labels) else 0
    reference = FeedbackMatrix(str(folder), snapshot.store, snapshot.digest,
                               int((~wild).sum()), int((~wild).sum()) * (1 + copies),
                               int(wild.sum()), snapshot.rejected, feedback_spec.weight)
    if not (folder / "ids.json").is_file():
        if copies:
            extra_pixels, source = augment(train_pixels, augment_spec, seed)
            train_pixels = np.concatenate([train_pixels, extra_pixels])
            train_labels = np.concatenate([train_labels, train_labels[source]])
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
        np.save(staging / "train_features.npy", apply_feature_stage(stage, train_pixels))
        np.save(staging / "train_labels.npy", train_labels)
        np.save(staging / "wild_features.npy",
                apply_feature_stage(stage, snapshot.pixels[wild]))
        np.save(staging / "wild_labels.npy", snapshot.labels[wild])
        render_label_grid(snapshot.pixels.reshape(-1, 28, 28), snapshot.labels,
                          staging / "sample-grid-feedback.png", title="feedback")
        ids = np.asarray(snapshot.ids, dtype=object)
        (staging / "ids.json").write_text(json.dumps(
            {"train": ids[~wild].tolist(), "wild": ids[wild].tolist()}))
        place_in_cache(staging, folder, marker="ids.json")
    logger.info("feedback %s: %d records for training (%d rows with augmented copies), %d in "
                "the wild test set, %d rejected left out", snapshot.store,
                reference.train_records, reference.train_rows, reference.wild_rows,
                reference.rejected)
    create_table_artifact(
        key="mnist-feedback-label-counts",
        table=[{"part": part, **{str(d): int((labels == d).sum()) for d in range(N_CLASSES)},
                "total": len(labels)}
               for part, labels in (("training", snapshot.labels[~wild]),
                                    ("wild test", snapshot.labels[wild]))],
        description=f"Feedback records per digit in {snapshot.store} "
                    f"(snapshot {snapshot.digest[:12]}; {snapshot.rejected} rejected)")
    create_png_artifact(Path(reference.sample_grid), "mnist-feedback-sample-grid",
                        f"Feedback drawings of each digit, as the models see them "
                        f"(snapshot {snapshot.digest[:12]}; rejected records left out)")
    return reference


@task(name="train-fold")
def train_fold(matrix: FeatureMatrix, spec: ExperimentSpec,
               config: GbdtConfig | BaggedBoostingConfig, fold_index: int, threads: int,
               fits_dir: Path, augmented: AugmentedMatrix | None = None,
               feedback: FeedbackMatrix | None = None) -> FitResult:
    """Fold `fold_index`'s model (`fit_fold`), or its finished fit stored by an earlier run."""
    return fit_fold(matrix, spec, config, fold_index, threads, fits_dir, augmented, feedback)


@task(name="train-final-model")
def train_final(train_matrix: FeatureMatrix, test_matrix: FeatureMatrix, spec: ExperimentSpec,
                config: GbdtConfig | BaggedBoostingConfig, threads: int,
                fits_dir: Path, augmented: AugmentedMatrix | None = None,
                feedback: FeedbackMatrix | None = None) -> FitResult:
    """The final model (`fit_final`), or its finished fit stored by an earlier run."""
    return fit_final(train_matrix, test_matrix, spec, config, threads, fits_dir, augmented,
                     feedback)


# --- MLflow ----------------------------------------------------------------------------------


def _metrics(prefix: str, evaluation: Evaluation) -> dict[str, float]:
    return {f"{prefix}{name}": value for name, value in evaluation.scalar_metrics().items()}


def _log_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    for start in range(0, len(batch), 500):  # the REST API's batch limit is 1,000
        client.log_batch(run_id, metrics=batch[start:start + 500])


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    batch = [Param(key, value[:6000]) for key, value in params.items()]
    for start in range(0, len(batch), 90):  # the params batch limit is 100
        client.log_batch(run_id, params=batch[start:start + 90])


def _wild_metrics(prefix: str, result: FitResult) -> dict[str, float]:
    """`wild_accuracy` and the rest on the wild test set, and `wild_rows` (0 without one)."""
    if result.wild_evaluation is None:
        return {f"{prefix}wild_rows": 0.0} if result.feedback_rows else {}
    return {**_metrics(f"{prefix}wild_", result.wild_evaluation),
            f"{prefix}wild_rows": float(result.wild_evaluation.rows),
            f"{prefix}feedback_train_rows": float(result.feedback_rows)}


@task(name="prepare-experiment", **SERVICE_CALL_RETRIES)
def prepare_experiment(experiment: str, tracking_uri: str) -> str:
    """The MLflow experiment's id, created if needed. The flow runs this while the data is
    fetched: the first use of a new SQLite store builds its schema, seconds of work that
    need not wait for the data."""
    return ensure_experiment(tracking_client(tracking_uri), experiment, tracking_uri)


@task(name="start-experiment-run", **SERVICE_CALL_RETRIES)
def start_experiment_run(spec: ExperimentSpec, experiment_id: str,
                         algorithm_params: dict[str, str], dataset_fingerprint: str,
                         tracking_uri: str, flow_run_id: str | None) -> str:
    """The parent run: the whole spec and the algorithm's parameters as params. A run that
    an earlier attempt of this same flow run left RUNNING (its process was killed outright,
    so no hook ended it) is ended as KILLED first. Each links the other: the MLflow run is
    tagged with the Prefect flow run (its id, and its page when a Prefect UI is
    configured), and the flow run gets a link artifact to the run's page on an MLflow
    tracking server."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    client = tracking_client(tracking_uri)
    if flow_run_id and (stale := end_open_runs(client, flow_run_id, "KILLED")):
        get_run_logger().warning("ended MLflow runs %s, left open by a dead earlier attempt "
                                 "of this flow run, as KILLED", ", ".join(stale))
    tags = {"mlpaint.dataset_fingerprint": dataset_fingerprint,
            "mlflow.runName": f"{spec.algorithm}-{spec.features.value}"}
    if flow_run_id:
        tags[FLOW_RUN_TAG] = flow_run_id
        if PREFECT_UI_URL.value():
            tags[FLOW_RUN_URL_TAG] = flow_run.ui_url
    run = client.create_run(experiment_id, tags=tags)
    _log_params(client, run.info.run_id, {**spec.flat_params(), **algorithm_params})
    if tracking_uri.startswith(("http://", "https://")):
        create_link_artifact(
            key="mlflow-run",
            link=f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/"
                 f"{run.info.run_id}",
            link_text=f"MLflow run {run.info.run_id}",
            description="This experiment's parent run on the MLflow tracking server")
    return run.info.run_id


@task(name="log-datasets", **SERVICE_CALL_RETRIES)
def log_data_inputs(parent_run_id: str, tables: dict[str, str], limit: int | None,
                    feedback: FeedbackMatrix | None, tracking_uri: str) -> None:
    """The parent run's inputs: MNIST's training and test splits and, when used, the
    feedback snapshot's training part and wild test set, each with its digest and rows."""
    uses = []
    for split, context in (("train", "training"), ("test", "testing")):
        meta = load_table(Path(tables[split])).meta
        digest = hashlib.sha256(json.dumps(sorted(meta.inputs_sha256.values())).encode())
        uses.append(DatasetUse(f"mnist-{split}", digest.hexdigest(), meta.origin,
                               min(limit, meta.rows) if limit else meta.rows, context))
    if feedback is not None:
        uses += [DatasetUse("feedback", feedback.digest, feedback.store,
                            feedback.train_records, "training"),
                 DatasetUse("feedback-wild", feedback.digest, feedback.store,
                            feedback.wild_rows, "wild test")]
    log_datasets(tracking_client(tracking_uri), parent_run_id, uses)


def _write_fit_artifacts(result: FitResult, folder: Path, title: str) -> list[Path]:
    paths = write_evaluation_artifacts(result.evaluation, folder, title)
    statistics = folder / "statistics.json"
    statistics.write_text(json.dumps({
        "test": result.evaluation.to_json(),
        "train": result.train_evaluation.to_json() if result.train_evaluation else None,
        "train_rows": result.train_rows, "fit_seconds": result.seconds}, indent=1))
    return [*paths, statistics]


#: On a fold run: "true" when its fit was taken from an earlier attempt's finished work.
FIT_REUSED_TAG = "mlpaint.fit_reused"


@task(name="log-fold-run", **SERVICE_CALL_RETRIES)
def log_fold_run(result: FitResult, parent_run_id: str, tracking_uri: str) -> str:
    """A nested run for one fold: its metrics, evaluation artifacts and model files.

    Idempotent: a retry after a failed call (the tracking server went away halfway) finishes
    the fold run the first try created instead of creating a second one. The run carries
    the parent's Prefect flow run tag, so a dead attempt's open fold runs are ended too."""
    client = tracking_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    earlier = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                      f"tags.`mlflow.runName` = '{result.name}'")
    if earlier and earlier[0].info.status == "FINISHED":
        return earlier[0].info.run_id
    if earlier:
        run_id = earlier[0].info.run_id
    else:
        tags = {"mlflow.parentRunId": parent_run_id, "mlflow.runName": result.name,
                FIT_REUSED_TAG: str(result.reused).lower()}
        if FLOW_RUN_TAG in parent.data.tags:
            tags[FLOW_RUN_TAG] = parent.data.tags[FLOW_RUN_TAG]
        run_id = client.create_run(parent.info.experiment_id, tags=tags).info.run_id
    _log_params(client, run_id, {"fold": result.name, "train_rows": str(result.train_rows),
                                 "test_rows": str(result.test_rows)})
    metrics = {**_metrics("", result.evaluation), **_wild_metrics("", result)}
    if result.train_evaluation:
        metrics.update(_metrics("train_", result.train_evaluation))
    metrics["fit_seconds"] = result.seconds
    metrics["fit_threads"] = result.threads
    metrics["fit_peak_rss_mb"] = result.peak_rss_mb
    _log_metrics(client, run_id, metrics)
    with tempfile.TemporaryDirectory() as scratch:
        for path in _write_fit_artifacts(result, Path(scratch), result.name):
            client.log_artifact(run_id, str(path), "evaluation")
    client.log_artifacts(run_id, result.model_dir, "model")
    client.set_terminated(run_id)
    return run_id


@task(name="log-final-model", **SERVICE_CALL_RETRIES)
def log_final_model(final: FitResult, test_table_dir: str, parent_run_id: str,
                    tracking_uri: str) -> RegisteredModel:
    """The final model in the parent run as a pixel-in pyfunc (its feature stage inside),
    with two official test digits as its input example, registered as `mnist-digits`."""
    example = load_table(Path(test_table_dir)).pixels[:2]
    # Registered while folds may still train; marked complete only when they all have.
    return log_digit_model(tracking_client(tracking_uri), parent_run_id, Path(final.model_dir),
                           example, complete=False)


@task(name="log-experiment-summary", **SERVICE_CALL_RETRIES)
def log_experiment_summary(summary: ExperimentSummary, spec: ExperimentSpec,
                           sample_grid: str | None, tracking_uri: str) -> None:
    """Aggregates and test metrics on the parent run, its artifacts, and the end of the run."""
    client = tracking_client(tracking_uri)
    run_id = summary.parent_run_id
    metrics = {}
    for name, stats in summary.aggregated.items():
        metrics.update({f"folds_{name}_{k}": v for k, v in asdict(stats).items()})
    if summary.final:
        metrics.update(_metrics("test_", summary.final.evaluation))
        metrics.update(_wild_metrics("", summary.final))
    # The flow's own process is measured by recording_resources; fits may run elsewhere.
    metrics["resources/fit_peak_rss_mb"] = max(
        fit.peak_rss_mb for fit in [*summary.folds, *filter(None, [summary.final])])
    _log_metrics(client, run_id, metrics)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if summary.final:
            for path in _write_fit_artifacts(summary.final, folder / "test", "official test"):
                client.log_artifact(run_id, str(path), "evaluation/test")
        (folder / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
        (folder / "summary.json").write_text(json.dumps(summary.to_json(), indent=1))
        client.log_artifact(run_id, str(folder / "spec.json"))
        client.log_artifact(run_id, str(folder / "summary.json"))
    if sample_grid:
        client.log_artifact(run_id, sample_grid, "data")
    if summary.feedback:
        client.log_artifact(run_id, summary.feedback.sample_grid, "data")
    if summary.registered:
        mark_complete(client, summary.registered)
    client.set_terminated(run_id)
