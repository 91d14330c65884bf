"""Prefect tasks for ingestion: thin wrappers that add retries, logging and file I/O around
the plain functions in `mlpaint.data`. Tasks hand each other paths, never arrays."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from mlpaint.data.dataset import load_table, save_table, table_cache_key, table_from_files
from mlpaint.data.explore import DatasetReport, SplitSummary, render_sample_grid, summarize
from mlpaint.data.fetch import FetchContext, SplitFiles, fetch_dataset
from mlpaint.data.integrity import BlobCache, Pins
from mlpaint.data.pendigits import (
    fetch_pen_trajectories,
    pen_table_cache_key,
    read_pen_file,
    save_pen_table,
)
from mlpaint.data.pins import N_CLASSES, Split
from mlpaint.data.transports import ProgressCallback
from mlpaint.storage.manifest import is_whole
from tasks.artifacts import create_png_artifact


class _ProgressReporter:
    """Download progress: a tqdm bar when stderr is a terminal, and a log line at every 10%
    (or every 10 MiB when the size is unknown) so Prefect's logs show it too."""

    def __init__(self, what: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.what = what
        self.logger = logger
        self.bar = None
        self.next_log_fraction = 0.1
        self.next_log_bytes = 10 << 20

    def __call__(self, done: int, total: int | None) -> None:
        if self.bar is None and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=self.what.rsplit("/")[-1],
                            leave=False)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if total is not None and done >= total:
                self.bar.close()
        if total:
            if done / total >= self.next_log_fraction or done == total:
                self.logger.info("%s: %d%% of %.1f MB", self.what, 100 * done // total,
                                 total / 1e6)
                while self.next_log_fraction <= done / total:
                    self.next_log_fraction += 0.1
        elif done >= self.next_log_bytes:
            self.logger.info("%s: %.1f MB", self.what, done / 1e6)
            self.next_log_bytes += 10 << 20


def _progress_factory(logger):
    def make(what: str) -> ProgressCallback:
        return _ProgressReporter(what, logger)

    return make


def _chain_failed_transiently(task, task_run, state) -> bool:
    """Retry the whole chain only after a passing failure (say a network outage); a file that
    is missing everywhere or fails its hash will not get better in 30 seconds."""
    error = state.result(raise_on_failure=False)
    return bool(getattr(error, "transient", False))


@task(name="fetch-mnist-files", retries=1, retry_delay_seconds=30,
      retry_condition_fn=_chain_failed_transiently)
def fetch_mnist_files(sources: list[str] | None, sha256: dict[str, str],
                      cache_dir: Path) -> dict[Split, SplitFiles]:
    """Fetch and verify every split's files into the cache; return their cache paths.

    Transient failures are retried inside, per file, before moving to the next mirror; the
    task-level retry covers a whole chain that failed (for instance a network outage)."""
    logger = get_run_logger()
    context = FetchContext(Pins(dict(sha256)), BlobCache(cache_dir),
                           progress=_progress_factory(logger))
    fetched = fetch_dataset(sources, context)
    for split, files in sorted(fetched.items()):
        logger.info("%s: from %s (%s)", split.value, files.origin,
                    "verified" if files.verified else "UNVERIFIED")
    return fetched


@task(name="fetch-pen-trajectories", retries=1, retry_delay_seconds=30,
      retry_condition_fn=_chain_failed_transiently)
def fetch_pen_table(sources: list[str] | None, cache_dir: Path) -> Path:
    """Fetch and verify the pen trajectories (the first source of the chain that yields them
    intact) and parse them into a table folder, cached by the hash of what was parsed."""
    logger = get_run_logger()
    context = FetchContext(Pins(), BlobCache(cache_dir), progress=_progress_factory(logger))
    fetched, origin = fetch_pen_trajectories(sources, context)
    folder = cache_dir / "tables" / pen_table_cache_key(fetched.sha256) / "pen"
    if is_whole(folder):
        logger.info("pen trajectories from %s: table cached at %s", origin, folder)
        return folder
    table = read_pen_file(fetched.path, origin=origin, sha256=fetched.sha256,
                          verified=fetched.verified)
    save_pen_table(table, folder)
    logger.info("pen trajectories from %s (%s): %d digits by %d writers, label counts %s, in "
                "%s", origin, "verified" if fetched.verified else "UNVERIFIED", len(table),
                table.meta.writers, table.label_counts(), folder)
    return folder


@task(name="join-split")
def join_split_table(files: SplitFiles, cache_dir: Path) -> Path:
    """Parse and join one split into a table folder, cached by the hashes it was built from."""
    folder = cache_dir / "tables" / table_cache_key(files) / files.split.value
    if is_whole(folder):
        get_run_logger().info("%s: table cached at %s", files.split.value, folder)
        return folder
    table = table_from_files(files)
    save_table(table, folder)
    get_run_logger().info("%s: joined %d rows into %s", files.split.value, table.meta.rows,
                          folder)
    return folder


@task(name="explore-dataset")
def explore_dataset(tables: dict[Split, Path], fingerprint: str, report_dir: Path,
                    samples_per_label: int, seed: int) -> DatasetReport:
    """Row and feature counts, label counts per split, a sample grid per split; published as
    Prefect artifacts (a table and a markdown summary) and written to `report_dir`."""
    logger = get_run_logger()
    summaries: dict[str, SplitSummary] = {}
    grids: dict[str, str] = {}
    for split, folder in sorted(tables.items()):
        table = load_table(folder)
        summaries[split.value] = summarize(table)
        grid = render_sample_grid(table, report_dir / f"sample-grid-{split.value}.png",
                                  per_label=samples_per_label, seed=seed)
        grids[split.value] = str(grid)
        logger.info("%s: %d examples, %d features, label counts %s", split.value,
                    summaries[split.value].rows, summaries[split.value].features,
                    summaries[split.value].label_counts)
    report = DatasetReport(fingerprint, {s.value: str(p) for s, p in tables.items()},
                           summaries, grids, str(report_dir))
    (report_dir / "summary.json").write_text(json.dumps(report.to_json(), indent=2))

    create_table_artifact(
        key="mnist-label-counts",
        table=[{"split": split, **{str(d): s.label_counts[d] for d in range(N_CLASSES)},
                "total": s.rows} for split, s in summaries.items()],
        description="Examples per digit in each split",
    )
    lines = [f"# MNIST dataset `{fingerprint[:12]}`", "",
             "| split | rows | features | verified | origin |", "|---|---|---|---|---|"]
    lines += [f"| {split} | {s.rows:,} | {s.features} | {'yes' if s.verified else '**NO**'} "
              f"| `{s.origin}` |" for split, s in summaries.items()]
    lines += ["", f"Sample grids: {', '.join(f'`{g}`' for g in grids.values())}"]
    create_markdown_artifact(key="mnist-dataset-summary", markdown="\n".join(lines),
                             description="What the ingestion flow fetched and joined")
    for split, grid in grids.items():
        create_png_artifact(Path(grid), f"mnist-sample-grid-{split}",
                            f"{samples_per_label} random {split} examples of each digit")
    return report
