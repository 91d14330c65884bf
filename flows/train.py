"""The training flow: MLDB's `classifier.experiment` as a Prefect flow tracked in MLflow."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from prefect import flow
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from flows.attempts import check_attempts
from flows.ingest import ingest_mnist
from flows.runners import ClusterOrThreadsTaskRunner
from mlpaint.data.dataset import load_table
from mlpaint.data.explore import DatasetReport
from mlpaint.data.fetch import IngestSpec
from mlpaint.storage.catalog import Catalog, sweep_stale_work
from mlpaint.tracking import (
    end_open_runs,
    recording_resources,
    resolve_tracking_uri,
    tracking_client,
)
from mlpaint.training.algorithms import BaggedBoostingConfig, GbdtConfig, load_algorithms
from mlpaint.training.evaluation import aggregate
from mlpaint.training.fits import (
    ExperimentSummary,
    drawn_low_confidence,
    fit_threads,
    fits_to_train,
)
from mlpaint.training.matrices import AugmentedMatrix, FeatureMatrix, FeedbackMatrix, PenMatrix
from mlpaint.training.spec import ExperimentSpec, SpecError, check_spec, plan_folds
from mlpaint.training.warm_start import WarmStartBase
from tasks.data import fetch_pen_table
from tasks.progress import as_completed_waking, fits_stop_if_the_run_ends_early
from tasks.training import (
    choose_low_confidence_threshold,
    log_data_inputs,
    log_experiment_summary,
    log_final_model,
    log_fold_run,
    prepare_augmented,
    prepare_experiment,
    prepare_features,
    prepare_feedback,
    prepare_pen,
    prepare_warm_start,
    share_table,
    start_experiment_run,
    train_final,
    train_fold,
)


def _end_open_mlflow_runs(status: str):
    """A flow state hook: the MLflow runs this flow run left open end with `status`, so the
    dashboard tells a failed, crashed or cancelled experiment from a finished one. (A
    process killed outright runs no hook; see README, "When a run dies".)"""

    def hook(flow, flow_run, state) -> None:
        ended = end_open_runs(tracking_client(resolve_tracking_uri()), str(flow_run.id), status)
        logging.getLogger(__name__).warning(
            "flow run %s ended %s: MLflow runs %s marked %s", flow_run.id, state.type.value,
            ", ".join(ended) or "(none open)", status)

    return hook


@flow(name="train-mnist",
      task_runner=ClusterOrThreadsTaskRunner(max_workers=os.cpu_count() or 1),
      on_failure=[_end_open_mlflow_runs("FAILED")],
      on_crashed=[_end_open_mlflow_runs("KILLED")],
      on_cancellation=[_end_open_mlflow_runs("KILLED")])
def train_mnist(
    spec: ExperimentSpec | None = None,
    publish_to: str | None = None,
    store: str | None = None,
    cache_dir: str | None = None,
    algorithms_path: str | None = None,
) -> ExperimentSummary:
    """Cross-fold training: one LightGBM model per fold, aggregated statistics, a final model
    on all training rows scored on the official test set, all of it in MLflow. A warm start
    (`spec.warm_start`) instead continues a registered model's boosting: the final model
    alone.

    Args:
        spec: the experiment: algorithm, feature stage, folds, data, augmentation, feedback.
            The run trains exactly this, recorded whole in MLflow's params; a field not given
            is the packaged default spec's (None: that spec, what `make run` trains).
        publish_to: publish the final model (bundle, explanations, gate) to this folder or
            s3://bucket/prefix in the same run.
        store: where features, augmented rows and fitted models are kept, a folder or
            s3://bucket/prefix (default $MLPAINT_STORE, else the cache folder). Dask workers
            on other machines need a store they can all reach: S3 or MinIO.
        cache_dir: this machine's cache: fetched data, tables, work areas, and copies of a
            remote store's artefacts (default $MLPAINT_CACHE_DIR or ~/.cache/mlpaint).
        algorithms_path: a YAML file of named algorithm configurations (default the packaged
            algorithms.yaml).
    """
    check_attempts()
    algorithms = load_algorithms(Path(algorithms_path) if algorithms_path else None)
    spec = check_spec(spec or ExperimentSpec(), frozenset(algorithms))
    if publish_to and not spec.final_fit:
        raise SpecError(f"publish_to: {publish_to!r} asks to publish, but final_fit is false: "
                        "there would be no final model to publish")
    config = algorithms[spec.algorithm]
    catalog = Catalog.from_settings(store, cache_dir)
    cache = Path(catalog.cache_dir)
    if stale := sweep_stale_work(cache):
        get_run_logger().info("removed %d staging folders and work areas that runs killed "
                              "a day or more ago left in %s", len(stale), cache)
    tracking_uri = resolve_tracking_uri()
    dataset = ingest_mnist(IngestSpec(sources=spec.sources, seed=spec.seed), str(cache))
    # After the ingestion subflow has begun, not beside it: on a SQLite Prefect server (the
    # temporary one), the records of a task finishing just then made creating the subflow
    # run fail with "database is locked" in most runs, and Prefect's client retried it
    # seconds later. The command opens a local MLflow store before the flow, so this is
    # quick.
    experiment_id = prepare_experiment.submit(spec.experiment, tracking_uri)
    # The tables by URIs every worker can read (a copy in the store when it is remote).
    tables = {split: share_table(folder, catalog) for split, folder in dataset.tables.items()}
    train_matrix = prepare_features.submit(tables["train"], spec.features, spec.limit,
                                           catalog)
    test_matrix = prepare_features.submit(tables["test"], spec.features, spec.limit, catalog)
    augmented = (prepare_augmented.submit(tables["train"], spec.features, spec.limit,
                                          spec.augment, spec.seed, catalog)
                 if spec.augment.copies else None)
    feedback_future = (prepare_feedback.submit(spec.feedback, spec.features, spec.augment,
                                               spec.seed, catalog)
                       if spec.feedback.store else None)
    pen_table = share_table(str(fetch_pen_table(spec.pen.sources, cache)), catalog)
    pen_future = prepare_pen.submit(pen_table, spec.pen, spec.features, spec.limit,
                                    spec.augment, spec.seed, catalog)
    # Fail on a fold with an empty side before anything trains.
    row_hash = load_table(Path(dataset.tables["train"])).row_hash[: spec.limit]
    n_folds = len(plan_folds(spec.folds, row_hash))
    experiment = experiment_id.result()  # a new local store is whole from here on
    base = (prepare_warm_start(spec, config, catalog, tracking_uri)
            if spec.warm_start.alias else None)
    if base is not None:
        n_folds = 0  # the base model trained on every row a fold would hold out

    parent_run_id = start_experiment_run(spec, experiment,
                                         {**{f"lightgbm.{k}": str(v) for k, v in
                                             config.params.items()},
                                          **(base.params() if base else {})},
                                         dataset.fingerprint, tracking_uri, flow_run.get_id())
    with recording_resources(tracking_uri, parent_run_id, cache), \
            fits_stop_if_the_run_ends_early():
        summary = _train_and_log(spec, config, dataset, catalog, tracking_uri, parent_run_id,
                                 n_folds, train_matrix, test_matrix, augmented,
                                 feedback_future, pen_future, base)
    if publish_to and summary.registered:
        from flows.publish import publish_model
        from mlpaint.publishing.spec import PublishSpec

        report = publish_model(PublishSpec(
            model_version=summary.registered.version, to=publish_to, sources=spec.sources,
            feedback_store=spec.feedback.store, pen_sources=spec.pen.sources),
            cache_dir=str(cache))
        summary = dataclasses.replace(summary, publication=report.to_json())
    return summary


def _train_and_log(spec: ExperimentSpec, config: GbdtConfig | BaggedBoostingConfig,
                   dataset: DatasetReport, catalog: Catalog, tracking_uri: str,
                   parent_run_id: str,
                   n_folds: int, train_matrix: PrefectFuture[FeatureMatrix],
                   test_matrix: PrefectFuture[FeatureMatrix],
                   augmented: PrefectFuture[AugmentedMatrix] | None,
                   feedback_future: PrefectFuture[FeedbackMatrix] | None,
                   pen_future: PrefectFuture[PenMatrix],
                   base: WarmStartBase | None) -> ExperimentSummary:
    """Every fit, each logged to MLflow as it finishes, then the experiment's summary. A warm
    start (`base`) trains the final model alone, which keeps the base's "not sure"
    threshold."""
    feedback = feedback_future.result() if feedback_future is not None else None
    pen = pen_future.result()
    log_data_inputs(parent_run_id, dataset.tables, spec.limit, feedback, pen, tracking_uri)
    n_fits = n_folds + (1 if spec.final_fit else 0)
    # The cores are shared among the fits that will train, not those a rerun reuses: the
    # one fold a crash left unfinished gets every core.
    to_train = fits_to_train(spec, config, n_folds, catalog, train_matrix.result(),
                             test_matrix.result(), augmented.result() if augmented else None,
                             feedback, pen, base)
    threads = fit_threads(to_train)
    if to_train < n_fits:
        get_run_logger().info("%d of %d fits are stored from an earlier run and will be "
                              "reused; %d train, with %d thread(s) each", n_fits - to_train,
                              n_fits, to_train, threads)
    progress_id = create_progress_artifact(0.0, key="mnist-training-progress",
                                           description=f"fits done of {n_fits}")

    # The final fit is submitted first: it is the longest.
    final_future = (train_final.submit(train_matrix, test_matrix, spec, config, threads,
                                       catalog, augmented, feedback, pen, base)
                    if spec.final_fit else None)
    fold_futures = [train_fold.submit(train_matrix, spec, config, i, threads, catalog,
                                      augmented, feedback, pen)
                    for i in range(n_folds)]
    for done, future in enumerate(
            as_completed_waking([*fold_futures, *filter(None, [final_future])]), start=1):
        if future is not final_future:
            log_fold_run(future.result(), parent_run_id, tracking_uri)
        update_progress_artifact(progress_id, 100.0 * done / n_fits)
    fold_results = [future.result() for future in fold_futures]  # in fold order
    final = final_future.result() if final_future else None
    # Chosen on the folds' held-out writers, so the final model is registered only once
    # every fold has scored its own.
    low_confidence = choose_low_confidence_threshold(fold_results) if fold_results else None
    # Without folds to choose on, a continued model keeps its base's threshold and a model
    # trained from nothing takes the spec's (None: the model's default).
    threshold = (low_confidence.threshold if low_confidence
                 else base.low_confidence_below if base else spec.low_confidence_below)
    registered = (log_final_model(final, threshold, dataset.tables["test"],
                                  parent_run_id, tracking_uri) if final else None)

    summary = ExperimentSummary(
        parent_run_id, fold_results,
        aggregate([r.evaluation for r in fold_results]) if fold_results else {}, final,
        registered, feedback=feedback, pen=pen, low_confidence=low_confidence,
        low_confidence_below=threshold,
        drawn_low_confidence=drawn_low_confidence(final, threshold)
        if final and threshold is not None else None, warm_start=base)
    log_experiment_summary(summary, spec, dataset.sample_grids.get("train"), tracking_uri)
    _publish_prefect_artifacts(summary)
    return summary


def _publish_prefect_artifacts(summary: ExperimentSummary) -> None:
    """A markdown summary and the confusion matrix as a table, under fixed keys so the UI
    keeps their history from run to run."""
    lines = [f"# Training run `{summary.parent_run_id}`", "",
             "| fit | train rows | test rows | accuracy | weighted accuracy | log-loss | drawn "
             "accuracy |", "|---|---|---|---|---|---|---|"]
    fits = [*summary.folds, *([summary.final] if summary.final else [])]
    for fit in fits:
        e = fit.evaluation
        drawn = (f"{fit.drawn_evaluation.accuracy:.4f}" if fit.drawn_evaluation else "-")
        lines.append(f"| {fit.name} | {fit.train_rows:,} | {fit.test_rows:,} | "
                     f"{e.accuracy:.4f} | {e.weighted['accuracy']:.4f} | {e.log_loss:.4f} | "
                     f"{drawn} |")
    if accuracy := summary.aggregated.get("accuracy"):
        lines += ["", f"Folds: accuracy mean {accuracy.mean:.4f}, std {accuracy.std:.4f}, "
                      f"min {accuracy.min:.4f}, max {accuracy.max:.4f}."]
    if summary.warm_start:
        lines += ["", f"A warm start: {summary.warm_start.describe()} continued; no folds "
                      "trained."]
    if summary.registered:
        lines.append(f"Registered `{summary.registered.model_uri}`.")
    create_markdown_artifact(key="mnist-training-summary", markdown="\n".join(lines),
                             description="Per-fold and aggregated accuracy")
    shown = summary.final or summary.folds[-1]
    create_table_artifact(
        key="mnist-confusion-matrix",
        table=[{"actual": actual, **{str(p): n for p, n in enumerate(row)}}
               for actual, row in enumerate(shown.evaluation.confusion)],
        description=f"Confusion matrix of {shown.name} (rows actual, columns predicted)")
