"""Prefect tasks for training experiments.

Compute tasks (features, fits) take and return references to finished folders in the
catalog's store, which any worker can read, and carry no retries: a fit that failed will fail
again. Tasks that talk to the MLflow tracking store retry, since that
is I/O that can fail and is safe to repeat.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from prefect import task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.logging import get_run_logger

from mlpaint.data.dataset import load_table
from mlpaint.data.explore import render_label_grid
from mlpaint.data.pendigits import load_pen_table
from mlpaint.data.pins import N_CLASSES
from mlpaint.feedback.store import FeedbackSnapshot, FeedbackStore, wild_rows
from mlpaint.images.augment import AugmentSpec, augment
from mlpaint.model.features import FeatureStage, apply_feature_stage
from mlpaint.storage.catalog import (
    AUGMENTED,
    FEATURES,
    FEEDBACK_MATRICES,
    PEN_MATRICES,
    TABLES,
    Catalog,
    local_folder,
)
from mlpaint.tracking import (
    DatasetUse,
    RegisteredModel,
    ensure_experiment,
    log_datasets,
    log_digit_model,
    tracking_client,
)
from mlpaint.tracking.experiment import (
    log_fold,
    log_summary,
    run_page_url,
    start_parent_run,
)
from mlpaint.training.algorithms import BaggedBoostingConfig, DigitModel, GbdtConfig
from mlpaint.training.confidence import DEFAULT_LOW_CONFIDENCE_BELOW, ConfidenceChoice
from mlpaint.training.fits import (
    MODEL,
    ExperimentSummary,
    FitResult,
    choose_low_confidence,
    fit_final,
    fit_fold,
)
from mlpaint.training.keys import augmented_key, features_key, feedback_key, pen_matrix_key
from mlpaint.training.matrices import (
    PEN_SAMPLE_GRID,
    SAMPLE_GRID,
    AugmentedMatrix,
    FeatureMatrix,
    FeedbackMatrix,
    PenMatrix,
    pen_writers,
)
from mlpaint.training.pen import draw_pen_digits, pen_rows_expected
from mlpaint.training.spec import ExperimentSpec, FeedbackSpec, PenSpec
from mlpaint.training.warm_start import WarmStartBase, resolve_base
from tasks.artifacts import create_png_artifact
from tasks.progress import fit_should_stop, fit_watchers
from tasks.retries import SERVICE_CALL_RETRIES


@task(name="share-table", **SERVICE_CALL_RETRIES)
def share_table(folder: str, catalog: Catalog) -> str:
    """A joined table's URI any worker can read: the cache folder itself on a local store,
    else a copy published in the store (once per table)."""
    return catalog.share_folder(Path(folder), TABLES)


@task(name="prepare-features")
def prepare_features(table: str, stage: FeatureStage, limit: int | None,
                     catalog: Catalog) -> FeatureMatrix:
    """Apply the feature stage to a split (the table at URI `table`, its first `limit`
    rows), stored by table, stage, the stage code's version and limit."""
    location = catalog.location(FEATURES, features_key(table, stage, limit))
    split = load_table(local_folder(table))
    rows = min(limit, split.meta.rows) if limit else split.meta.rows
    if catalog.is_finished(location):
        return FeatureMatrix(location, rows, stage.value)
    with catalog.staging(location) as staging:  # a killed run leaves no half-written matrix
        FeatureMatrix.write(staging, features=apply_feature_stage(stage, split.pixels[:rows]),
                            labels=np.asarray(split.labels[:rows]),
                            row_hash=np.asarray(split.row_hash[:rows]))
        catalog.finish(staging, location)
    get_run_logger().info("%s features of %d %s rows in %s", stage.value, rows,
                          split.meta.split, location)
    return FeatureMatrix(location, rows, stage.value)


@task(name="prepare-augmented-rows")
def prepare_augmented(table: str, stage: FeatureStage, limit: int | None,
                      augment_spec: AugmentSpec, seed: int, catalog: Catalog) -> AugmentedMatrix:
    """Augmented copies of a split's (first `limit`) rows through the feature stage, stored
    by the table, the stage, the augmentation spec, the seed and the code's version."""
    location = catalog.location(AUGMENTED,
                                augmented_key(table, stage, limit, augment_spec, seed))
    split = load_table(local_folder(table))
    rows = min(limit, split.meta.rows) if limit else split.meta.rows
    if catalog.is_finished(location):
        return AugmentedMatrix(location, rows * augment_spec.copies)
    start = time.perf_counter()
    pixels, source = augment(np.asarray(split.pixels[:rows]), augment_spec, seed)
    with catalog.staging(location) as staging:
        AugmentedMatrix.write(staging, features=apply_feature_stage(stage, pixels),
                              labels=np.asarray(split.labels[:rows])[source], source_row=source)
        catalog.finish(staging, location)
    get_run_logger().info("%d augmented copies of %d %s rows in %.1f s, in %s",
                          augment_spec.copies, rows, split.meta.split,
                          time.perf_counter() - start, location)
    return AugmentedMatrix(location, len(source))


@task(name="prepare-feedback", **SERVICE_CALL_RETRIES)
def prepare_feedback(feedback_spec: FeedbackSpec, stage: FeatureStage,
                     augment_spec: AugmentSpec, seed: int, catalog: Catalog) -> FeedbackMatrix:
    """Snapshot the feedback store's accepted records, split off the wild test set by row
    hash, augment the rest as MNIST's rows are, and apply the feature stage; cached by the
    snapshot's content and everything else that shapes the result."""
    logger = get_run_logger()
    snapshot = FeedbackSnapshot.of(FeedbackStore.at(feedback_spec.store))
    wild = wild_rows(snapshot.row_hash, feedback_spec.wild_share)
    location = catalog.location(FEEDBACK_MATRICES, feedback_key(
        snapshot.digest, stage, feedback_spec.wild_share, augment_spec, seed))
    train_pixels, train_labels = snapshot.pixels[~wild], snapshot.labels[~wild]
    copies = augment_spec.copies if len(train_labels) else 0
    reference = FeedbackMatrix(location, snapshot.store, snapshot.digest,
                               int((~wild).sum()), int((~wild).sum()) * (1 + copies),
                               int(wild.sum()), snapshot.rejected, feedback_spec.weight)
    if not catalog.is_finished(location):
        if copies:
            extra_pixels, source = augment(train_pixels, augment_spec, seed)
            train_pixels = np.concatenate([train_pixels, extra_pixels])
            train_labels = np.concatenate([train_labels, train_labels[source]])
        with catalog.staging(location) as staging:
            ids = np.asarray(snapshot.ids, dtype=object)
            FeedbackMatrix.write(
                staging, train_features=apply_feature_stage(stage, train_pixels),
                train_labels=train_labels,
                wild_features=apply_feature_stage(stage, snapshot.pixels[wild]),
                wild_labels=snapshot.labels[wild],
                record_ids={"train": ids[~wild].tolist(), "wild": ids[wild].tolist()})
            render_label_grid(snapshot.pixels.reshape(-1, 28, 28), snapshot.labels,
                              staging / SAMPLE_GRID, title="feedback")
            catalog.finish(staging, location)
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
    create_png_artifact(reference.sample_grid(), "mnist-feedback-sample-grid",
                        f"Feedback drawings of each digit, as the models see them "
                        f"(snapshot {snapshot.digest[:12]}; rejected records left out)")
    return reference


@task(name="prepare-pen-drawings")
def prepare_pen(pen_table: str, pen_spec: PenSpec, stage: FeatureStage, limit: int | None,
                augment_spec: AugmentSpec, seed: int, catalog: Catalog) -> PenMatrix:
    """The pen trajectories (the table at URI `pen_table`, its first `limit` digits) drawn
    as the page draws them (`draw_pen_digits`) and through the feature stage, stored by
    everything that shapes the result (`pen_matrix_key`)."""
    logger = get_run_logger()
    table = load_pen_table(local_folder(pen_table))
    if limit is not None and limit < len(table):
        table = table.head(limit)
    location = catalog.location(PEN_MATRICES, pen_matrix_key(
        pen_table, pen_spec, stage, limit, augment_spec, seed))
    if not catalog.is_finished(location):
        start = time.perf_counter()
        drawings = draw_pen_digits(table, pen_spec, augment_spec, seed)
        with catalog.staging(location) as staging:
            PenMatrix.write(
                staging, train_features=apply_feature_stage(stage, drawings.train_pixels),
                train_labels=table.labels[drawings.train_source],
                train_row_hash=table.row_hash[drawings.train_source],
                drawn_features=apply_feature_stage(stage, drawings.drawn.pixels),
                drawn_labels=drawings.drawn.labels, drawn_writers=drawings.drawn.writers,
                writers={"train": drawings.train_writers, "drawn": drawings.drawn_writers})
            render_label_grid(drawings.drawn.pixels.reshape(-1, 28, 28), drawings.drawn.labels,
                              staging / PEN_SAMPLE_GRID, title="pen drawings")
            catalog.finish(staging, location)
        logger.info("pen drawings drawn in %.1f s", time.perf_counter() - start)
    writers = pen_writers(location)
    train_rows, rendered_rows = pen_rows_expected(table, pen_spec, augment_spec)
    reference = PenMatrix(location, table.meta.sha256, table.meta.origin, table.meta.verified,
                          train_rows, rendered_rows,
                          len(writers["train"]), int(np.isin(table.writers,
                                                             writers["drawn"]).sum()),
                          len(writers["drawn"]), pen_spec.weight)
    logger.info("pen drawings from %s: %d training rows from %d writers (%d renderings of "
                "each digit, %d augmented copies of each), %d digits of %d other writers in "
                "the drawn test set", table.meta.origin, reference.train_rows,
                reference.train_writers, pen_spec.renderings, augment_spec.copies,
                reference.drawn_rows, reference.drawn_writers)
    create_png_artifact(reference.sample_grid(), "mnist-pen-sample-grid",
                        "The drawn test set's digits (held-out writers' pen trajectories) as "
                        "the models see them")
    return reference


@task(name="prepare-warm-start", **SERVICE_CALL_RETRIES)
def prepare_warm_start(spec: ExperimentSpec, config: GbdtConfig | BaggedBoostingConfig,
                       catalog: Catalog, tracking_uri: str) -> WarmStartBase | None:
    """The registered version a warm start continues (`resolve_base`), or None, the reason
    logged as a warning, and the run trains from nothing."""
    base, said = resolve_base(spec, config, catalog, tracking_uri)
    (get_run_logger().info if base else get_run_logger().warning)("%s", said)
    return base


@task(name="train-fold")
def train_fold(matrix: FeatureMatrix, spec: ExperimentSpec,
               config: GbdtConfig | BaggedBoostingConfig, fold_index: int, threads: int,
               catalog: Catalog, augmented: AugmentedMatrix | None = None,
               feedback: FeedbackMatrix | None = None,
               pen: PenMatrix | None = None) -> FitResult:
    """Fold `fold_index`'s model (`fit_fold`), or its finished fit stored by an earlier run;
    its progress in the log, on the run's Artifacts tab and on a terminal."""
    return fit_fold(matrix, spec, config, fold_index, threads, catalog, augmented, feedback,
                    pen, watchers=fit_watchers(), should_stop=fit_should_stop())


@task(name="train-final-model")
def train_final(train_matrix: FeatureMatrix, test_matrix: FeatureMatrix, spec: ExperimentSpec,
                config: GbdtConfig | BaggedBoostingConfig, threads: int,
                catalog: Catalog, augmented: AugmentedMatrix | None = None,
                feedback: FeedbackMatrix | None = None,
                pen: PenMatrix | None = None,
                base: WarmStartBase | None = None) -> FitResult:
    """The final model (`fit_final`; continuing `base` in a warm start), or its finished fit
    stored by an earlier run; its progress shown as a fold's is."""
    return fit_final(train_matrix, test_matrix, spec, config, threads, catalog, augmented,
                     feedback, pen, watchers=fit_watchers(), should_stop=fit_should_stop(),
                     base=base)


@task(name="choose-low-confidence")
def choose_low_confidence_threshold(folds: list[FitResult]) -> ConfidenceChoice | None:
    """The final model's "not sure" threshold, chosen on the folds' held-out writers
    (`choose_low_confidence`)."""
    logger = get_run_logger()
    choice = choose_low_confidence(folds)
    if choice is None:
        logger.info("low confidence: no fold scored held-out writers' pen drawings to choose "
                    "a threshold on; the model marks answers below the default %.2f",
                    DEFAULT_LOW_CONFIDENCE_BELOW)
    elif choice.target_met:
        logger.info("low confidence: %s", choice.describe())
    else:
        logger.warning("low confidence: %s", choice.describe())
    return choice


# --- MLflow ----------------------------------------------------------------------------------


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
    """The parent run: the whole spec and the algorithm's parameters as params
    (`start_parent_run`, which first ends as KILLED what a dead earlier attempt of this flow
    run left open). Each run links the other: the MLflow run is tagged with the flow run's
    page when a Prefect UI is configured, and the flow run gets a link artifact to the
    MLflow run's page on a tracking server."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    run_id, stale = start_parent_run(
        tracking_client(tracking_uri), experiment_id, f"{spec.algorithm}-{spec.features.value}",
        {**spec.flat_params(), **algorithm_params}, dataset_fingerprint, flow_run_id,
        flow_run.ui_url if flow_run_id and PREFECT_UI_URL.value() else None)
    if stale:
        get_run_logger().warning("ended MLflow runs %s, left open by a dead earlier attempt "
                                 "of this flow run, as KILLED", ", ".join(stale))
    if page := run_page_url(tracking_uri, experiment_id, run_id):
        create_link_artifact(key="mlflow-run", link=page, link_text=f"MLflow run {run_id}",
                             description="This experiment's parent run on the MLflow "
                                         "tracking server")
    return run_id


@task(name="log-datasets", **SERVICE_CALL_RETRIES)
def log_data_inputs(parent_run_id: str, tables: dict[str, str], limit: int | None,
                    feedback: FeedbackMatrix | None, pen: PenMatrix | None,
                    tracking_uri: str) -> None:
    """The parent run's inputs: MNIST's training and test splits and, when used, the
    feedback snapshot's training part and wild test set and the pen drawings' training
    writers and drawn test set, each with its digest and rows."""
    uses = []
    for split, context in (("train", "training"), ("test", "testing")):
        meta = load_table(local_folder(tables[split])).meta
        digest = hashlib.sha256(json.dumps(sorted(meta.inputs_sha256.values())).encode())
        uses.append(DatasetUse(f"mnist-{split}", digest.hexdigest(), meta.origin,
                               min(limit, meta.rows) if limit else meta.rows, context))
    if feedback is not None:
        uses += [DatasetUse("feedback", feedback.digest, feedback.store,
                            feedback.train_records, "training"),
                 DatasetUse("feedback-wild", feedback.digest, feedback.store,
                            feedback.wild_rows, "wild test")]
    if pen is not None:
        uses += [DatasetUse("pen-drawings", pen.sha256, pen.origin, pen.train_rows,
                            "training"),
                 DatasetUse("pen-drawn-test", pen.sha256, pen.origin, pen.drawn_rows,
                            "drawn test")]
    log_datasets(tracking_client(tracking_uri), parent_run_id, uses)


@task(name="log-fold-run", **SERVICE_CALL_RETRIES)
def log_fold_run(result: FitResult, parent_run_id: str, tracking_uri: str) -> str:
    """A nested run for one fold (`log_fold`: idempotent, so this task may retry)."""
    return log_fold(tracking_client(tracking_uri), parent_run_id, result)


@task(name="log-final-model", **SERVICE_CALL_RETRIES)
def log_final_model(final: FitResult, low_confidence_below: float | None,
                    test_table: str, parent_run_id: str, tracking_uri: str) -> RegisteredModel:
    """The final model in the parent run as a pixel-in pyfunc (its feature stage inside),
    its card carrying the "not sure" threshold chosen for it (None: the one it has), with
    two official test digits as its input example, registered as `mnist-digits`."""
    example = load_table(local_folder(test_table)).pixels[:2]
    with tempfile.TemporaryDirectory() as scratch:
        # A copy: the fit store's folder is verified by its manifest and shared by reruns.
        model_dir = Path(shutil.copytree(final.model_folder(), Path(scratch) / MODEL))
        if low_confidence_below is not None:
            DigitModel.record_low_confidence_below(model_dir, low_confidence_below)
        # Marked complete only when the summary is logged.
        return log_digit_model(tracking_client(tracking_uri), parent_run_id, model_dir,
                               example, complete=False)


@task(name="log-experiment-summary", **SERVICE_CALL_RETRIES)
def log_experiment_summary(summary: ExperimentSummary, spec: ExperimentSpec,
                           sample_grid: str | None, tracking_uri: str) -> None:
    """Aggregates and test metrics on the parent run, its artifacts, and its end
    (`log_summary`)."""
    log_summary(tracking_client(tracking_uri), summary, spec, sample_grid)
