"""The ingestion flow: fetch and verify MNIST, join each split, explore it."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from mlpaint.data.explore import DatasetReport
from mlpaint.data.fetch import dataset_fingerprint
from mlpaint.data.integrity import default_cache_dir
from tasks.data import (
    explore_dataset,
    fetch_mnist_files,
    join_split_table,
)


@flow(name="ingest-mnist", log_prints=False)
def ingest_mnist(
    sources: list[str] | None = None,
    sha256: dict[str, str] | None = None,
    cache_dir: str | None = None,
    samples_per_label: int = 10,
    seed: int = 0,
) -> DatasetReport:
    """Fetch MNIST (the default mirror chain unless `sources` is given), verify it, join
    features with labels per split, and explore the result.

    Args:
        sources: URIs tried in order: `s3://bucket/prefix/`, `https://…/`, a local folder
            (four IDX files), a `*.pkl.gz` archive, or `*train*.csv` / `*test*.csv` files.
        sha256: pins for files without built-in hashes, `{file name: hex digest}`.
        cache_dir: where verified files and tables are kept (default `~/.cache/mlpaint`).
        samples_per_label: images per digit in the sample grid.
        seed: picks the sample-grid images.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    fetched = fetch_mnist_files(sources, sha256 or {}, cache)
    fingerprint = dataset_fingerprint(fetched)
    tables = {split: join_split_table.submit(files, cache) for split, files in fetched.items()}
    return explore_dataset({split: future.result() for split, future in tables.items()},
                           fingerprint, cache / "reports" / fingerprint[:16], samples_per_label,
                           seed)
