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


# viridis at nine evenly spaced points; the heat map's colours are interpolated between them.
_VIRIDIS = np.array([[0x44, 0x01, 0x54], [0x47, 0x2D, 0x7B], [0x3B, 0x52, 0x8B],
                     [0x2C, 0x72, 0x8E], [0x21, 0x90, 0x8C], [0x27, 0xAD, 0x81],
                     [0x5D, 0xC8, 0x63], [0xAA, 0xDC, 0x32], [0xFD, 0xE7, 0x25]], dtype=float)
# The heat map's drawing, in pixels: a square cell per (actual, predicted) pair, bands for
# the title, the axes' names and ticks, and the colour bar on the right.
_CELL = 44
_TITLE_BAND = 34
_LEFT_BAND = 64
_BOTTOM_BAND = 52
_BAR_GAP = 18
_BAR_WIDTH = 20
_BAR_LABELS = 56
_HEATMAP_FONT_SIZE = 13
_COUNT_FONT_SIZE = 11


def viridis(positions: np.ndarray) -> np.ndarray:
    """RGB (uint8) of the viridis colour map at `positions` in [0, 1] (clipped)."""
    scaled = np.clip(np.asarray(positions, dtype=float), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.minimum(np.floor(scaled).astype(int), len(_VIRIDIS) - 2)
    share = (scaled - low)[..., None]
    return np.rint(_VIRIDIS[low] * (1 - share) + _VIRIDIS[low + 1] * share).astype(np.uint8)


def log_colour_positions(counts: np.ndarray, top: int) -> np.ndarray:
    """Where each count (>= 1) lies on a log colour scale from 1 (0.0) to `top` (>= 2: 1.0)."""
    return np.log(np.maximum(counts, 1)) / np.log(top)


def render_confusion_heatmap(evaluation: Evaluation, destination: Path, title: str) -> Path:
    """The confusion matrix as a PNG: rows actual, columns predicted, each non-zero cell
    coloured on a log scale (so the few off-diagonal errors stay visible) with its count,
    zero cells left white, and a colour bar.

    Drawn with Pillow, not matplotlib: it is drawn for every fit while the others train,
    where matplotlib's import and figures take CPU the fits lose."""
    from PIL import Image, ImageDraw, ImageFont

    matrix = np.asarray(evaluation.confusion)
    n = matrix.shape[0]
    top = max(int(matrix.max()), 2)
    side = n * _CELL
    bar_left = _LEFT_BAND + side + _BAR_GAP
    canvas = Image.new("RGB", (bar_left + _BAR_WIDTH + _BAR_LABELS,
                               _TITLE_BAND + side + _BOTTOM_BAND), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=_HEATMAP_FONT_SIZE)
    small = ImageFont.load_default(size=_COUNT_FONT_SIZE)
    colours = viridis(log_colour_positions(matrix, top))
    for actual in range(n):
        for predicted in range(n):
            count = int(matrix[actual, predicted])
            if not count:
                continue
            left, upper = _LEFT_BAND + predicted * _CELL, _TITLE_BAND + actual * _CELL
            colour = tuple(int(c) for c in colours[actual, predicted])
            draw.rectangle((left, upper, left + _CELL - 1, upper + _CELL - 1), fill=colour)
            light = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 128
            draw.text((left + _CELL / 2, upper + _CELL / 2), str(count), font=small,
                      fill="black" if light else "white", anchor="mm")
    draw.rectangle((_LEFT_BAND - 1, _TITLE_BAND - 1, _LEFT_BAND + side, _TITLE_BAND + side),
                   outline="black")
    for index in range(n):
        centre = index * _CELL + _CELL / 2
        draw.text((_LEFT_BAND + centre, _TITLE_BAND + side + 6), str(index), font=font,
                  fill="black", anchor="mt")
        draw.text((_LEFT_BAND - 8, _TITLE_BAND + centre), str(index), font=font,
                  fill="black", anchor="rm")
    draw.text((_LEFT_BAND + side / 2, _TITLE_BAND + side + _BOTTOM_BAND - 6), "predicted",
              font=font, fill="black", anchor="mb")
    label = Image.new("RGB", (side, _HEATMAP_FONT_SIZE + 6), "white")
    ImageDraw.Draw(label).text((side / 2, label.height / 2), "actual", font=font,
                               fill="black", anchor="mm")
    canvas.paste(label.rotate(90, expand=True), (6, _TITLE_BAND))
    draw.text((canvas.width / 2, _TITLE_BAND / 2),
              f"{title}: accuracy {evaluation.accuracy:.4f} (log colour scale)", font=font,
              fill="black", anchor="mm")
    # The colour bar: 1 at the bottom, the largest count at the top, a tick per power of 10.
    gradient = viridis(np.linspace(1.0, 0.0, side))
    bar = np.repeat(gradient[:, None, :], _BAR_WIDTH, axis=1)
    canvas.paste(Image.fromarray(bar, mode="RGB"), (bar_left, _TITLE_BAND))
    draw.rectangle((bar_left - 1, _TITLE_BAND - 1, bar_left + _BAR_WIDTH, _TITLE_BAND + side),
                   outline="black")
    power = 1
    while power <= top:
        y = _TITLE_BAND + side - 1 - float(log_colour_positions(np.array(power), top)) * (
            side - 1)
        draw.line((bar_left + _BAR_WIDTH, y, bar_left + _BAR_WIDTH + 4, y), fill="black")
        draw.text((bar_left + _BAR_WIDTH + 7, y), f"{power:,}", font=small, fill="black",
                  anchor="lm")
        power *= 10
    destination.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(destination)
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
