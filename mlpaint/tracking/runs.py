"""An experiment's runs: their evaluation artifacts, the datasets they read, the resources
they used, and the end of the runs a dead flow run left open."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlpaint.tracking.store import tracking_client
from mlpaint.training.evaluation import Evaluation

logger = logging.getLogger(__name__)

FLOW_RUN_TAG = "prefect.flow_run_id"
FLOW_RUN_URL_TAG = "prefect.flow_run_url"  # its page in the Prefect UI, when there is one


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
