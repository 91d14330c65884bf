"""An experiment in MLflow: its parent run, one nested run per fold, and the summary that
ends it; every call through the client it is given, and each safe to repeat."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from mlpaint.tracking.registry import mark_complete
from mlpaint.tracking.runs import (
    FLOW_RUN_TAG,
    FLOW_RUN_URL_TAG,
    end_open_runs,
    write_evaluation_artifacts,
)

if TYPE_CHECKING:  # annotations only: mlpaint.training.fits imports mlpaint.tracking
    from mlpaint.training.evaluation import Evaluation
    from mlpaint.training.fits import ExperimentSummary, FitResult
    from mlpaint.training.spec import ExperimentSpec

#: On a fold run: "true" when its fit was taken from an earlier attempt's finished work.
FIT_REUSED_TAG = "mlpaint.fit_reused"


def _metrics(prefix: str, evaluation: Evaluation) -> dict[str, float]:
    return {f"{prefix}{name}": value for name, value in evaluation.scalar_metrics().items()}


def _log_metrics(client, run_id: str, metrics: dict[str, float],
                 model_id: str | None = None) -> None:
    """`metrics` on the run; with `model_id`, also on that logged model (its MLflow page, and
    the registry's comparison of versions)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, 0, model_id=model_id)
             for key, value in metrics.items()]
    for start in range(0, len(batch), 500):  # the REST API's batch limit is 1,000
        client.log_batch(run_id, metrics=batch[start:start + 500])


# The metrics a fit's learning curve is logged as, stepped by boosting round, so a run's
# chart shows how its watched rows' score grew (mlpaint.training.progress).
CURVE_METRICS = {"accuracy": "learning_curve/accuracy", "log_loss": "learning_curve/log_loss"}


def _log_curve(client, run_id: str, result: FitResult) -> None:
    """`result`'s learning curve, each point at its round, timed by when it was reached."""
    from mlflow.entities import Metric

    if not result.curve:
        return
    start = int(time.time() * 1000) - round(1000 * result.curve[-1].seconds)
    batch = [Metric(key, float(getattr(point, field)), start + round(1000 * point.seconds),
                    point.round)
             for point in result.curve for field, key in CURVE_METRICS.items()]
    for first in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[first:first + 500])


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


def _drawn_metrics(prefix: str, result: FitResult) -> dict[str, float]:
    """On the drawn test set (the held-out writers' pen drawings): `drawn_accuracy` and the
    rest, `drawn_rows`, each digit's accuracy (its recall) and the worst writer's."""
    if result.drawn_evaluation is None:
        return {}
    evaluation = result.drawn_evaluation
    metrics = {**_metrics(f"{prefix}drawn_", evaluation),
               f"{prefix}drawn_rows": float(evaluation.rows),
               f"{prefix}pen_train_rows": float(result.pen_rows)}
    metrics.update({f"{prefix}drawn_digit_{s.label}_accuracy": s.recall
                    for s in evaluation.labels})
    if result.drawn_writer_accuracy:
        metrics[f"{prefix}drawn_worst_writer_accuracy"] = min(
            result.drawn_writer_accuracy.values())
    if held_out := result.heldout_drawn_evaluation:
        metrics.update({f"{prefix}heldout_drawn_accuracy": held_out.accuracy,
                        f"{prefix}heldout_drawn_rows": float(held_out.rows)})
    return metrics


def _low_confidence_metrics(summary: ExperimentSummary) -> dict[str, float]:
    """The final model's "not sure" threshold (`low_confidence_below`), how it split the
    folds' held-out writers' drawings it was chosen on (`heldout_drawn_marked_share` …) and
    how it splits the drawn test set (`drawn_marked_share`, `drawn_plain_accuracy` …). A
    threshold no fold chose (a warm start's base's, a spec's) is measured on the drawn test
    set alone."""
    metrics = {}
    if summary.low_confidence is not None:
        chosen = summary.low_confidence.figures
        metrics = {"low_confidence_target_met": float(summary.low_confidence.target_met),
                   **chosen.metrics("heldout_drawn")}
    if summary.low_confidence_below is not None:
        metrics["low_confidence_below"] = summary.low_confidence_below
    if summary.drawn_low_confidence is not None:
        metrics.update(summary.drawn_low_confidence.metrics("drawn"))
    return metrics


def start_parent_run(client, experiment_id: str, run_name: str, params: dict[str, str],
                     dataset_fingerprint: str, flow_run_id: str | None,
                     flow_run_url: str | None) -> tuple[str, list[str]]:
    """The parent run of an experiment, with `params`; tagged with its Prefect flow run (the
    id, and its page when there is one). Runs that an earlier attempt of the same flow run
    left RUNNING (its process was killed outright, so no hook ended them) are ended as
    KILLED first. Returns the new run's id and the runs it ended."""
    stale = end_open_runs(client, flow_run_id, "KILLED") if flow_run_id else []
    tags = {"mlpaint.dataset_fingerprint": dataset_fingerprint, "mlflow.runName": run_name}
    if flow_run_id:
        tags[FLOW_RUN_TAG] = flow_run_id
    if flow_run_url:
        tags[FLOW_RUN_URL_TAG] = flow_run_url
    run = client.create_run(experiment_id, tags=tags)
    _log_params(client, run.info.run_id, params)
    return run.info.run_id, stale


def run_page_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI, when the tracking URI is a server."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _write_fit_artifacts(result: FitResult, folder: Path, title: str) -> list[Path]:
    paths = write_evaluation_artifacts(result.evaluation, folder, title)
    statistics = folder / "statistics.json"
    statistics.write_text(json.dumps({
        "test": result.evaluation.to_json(),
        "train": result.train_evaluation.to_json() if result.train_evaluation else None,
        "train_rows": result.train_rows, "fit_seconds": result.seconds}, indent=1))
    return [*paths, statistics]


def log_fold(client, parent_run_id: str, result: FitResult) -> str:
    """A nested run for one fold: its metrics, evaluation artifacts and model files.

    Idempotent: a retry after a failed call (the tracking server went away halfway) finishes
    the fold run the first try created instead of creating a second one. The run carries
    the parent's Prefect flow run tag, so a dead attempt's open fold runs are ended too."""
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
    metrics = {**_metrics("", result.evaluation), **_wild_metrics("", result),
               **_drawn_metrics("", result)}
    if result.train_evaluation:
        metrics.update(_metrics("train_", result.train_evaluation))
    metrics["fit_seconds"] = result.seconds
    metrics["fit_threads"] = result.threads
    metrics["fit_peak_rss_mb"] = result.peak_rss_mb
    _log_metrics(client, run_id, metrics)
    _log_curve(client, run_id, result)
    with tempfile.TemporaryDirectory() as scratch:
        for path in _write_fit_artifacts(result, Path(scratch), result.name):
            client.log_artifact(run_id, str(path), "evaluation")
    client.log_artifacts(run_id, str(result.model_folder()), "model")
    client.set_terminated(run_id)
    return run_id


def log_summary(client, summary: ExperimentSummary, spec: ExperimentSpec,
                sample_grid: str | None) -> None:
    """Aggregates and test metrics on the parent run, its artifacts, and the end of the run."""
    run_id = summary.parent_run_id
    metrics = {}
    for name, stats in summary.aggregated.items():
        metrics.update({f"folds_{name}_{k}": v for k, v in asdict(stats).items()})
    # The final model's own figures: on the run, and on the model it registered.
    model_metrics = _low_confidence_metrics(summary)
    if summary.final:
        model_metrics.update({**_metrics("test_", summary.final.evaluation),
                              **_wild_metrics("", summary.final),
                              **_drawn_metrics("", summary.final)})
    # The flow's own process is measured by recording_resources; fits may run elsewhere.
    metrics["resources/fit_peak_rss_mb"] = max(
        fit.peak_rss_mb for fit in [*summary.folds, *filter(None, [summary.final])])
    _log_metrics(client, run_id, metrics)
    _log_metrics(client, run_id, model_metrics,
                 summary.registered.model_id if summary.registered else None)
    if summary.final:
        _log_curve(client, run_id, summary.final)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if summary.final:
            for path in _write_fit_artifacts(summary.final, folder / "test", "official test"):
                client.log_artifact(run_id, str(path), "evaluation/test")
            if summary.final.drawn_evaluation:
                for path in write_evaluation_artifacts(summary.final.drawn_evaluation,
                                                       folder / "drawn", "drawn test"):
                    client.log_artifact(run_id, str(path), "evaluation/drawn")
        if summary.feedback:
            # Which records it trained on and which it kept out, so what any later
            # comparison may score it on can be checked against what it saw.
            (folder / "feedback-records.json").write_text(json.dumps({
                **summary.feedback.to_json(), "wild_share": spec.feedback.wild_share,
                **summary.feedback.record_ids()}))
            client.log_artifact(run_id, str(folder / "feedback-records.json"), "data")
        (folder / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
        (folder / "summary.json").write_text(json.dumps(summary.to_json(), indent=1))
        client.log_artifact(run_id, str(folder / "spec.json"))
        client.log_artifact(run_id, str(folder / "summary.json"))
    if sample_grid:
        client.log_artifact(run_id, sample_grid, "data")
    if summary.feedback:
        client.log_artifact(run_id, str(summary.feedback.sample_grid()), "data")
    if summary.pen:
        client.log_artifact(run_id, str(summary.pen.sample_grid()), "data")
    if summary.registered:
        mark_complete(client, summary.registered)
    client.set_terminated(run_id)
