"""The ingestion flow: fetch and verify MNIST, join each split, explore it."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from mlpaint.data.explore import DatasetReport
from mlpaint.data.fetch import IngestSpec, dataset_fingerprint
from mlpaint.data.integrity import default_cache_dir
from tasks.data import (
    explore_dataset,
    fetch_mnist_files,
    join_split_table,
)


@flow(name="ingest-mnist", log_prints=False)
def ingest_mnist(spec: IngestSpec | None = None, cache_dir: str | None = None
                 ) -> DatasetReport:
    """Fetch MNIST (the default mirror chain unless the spec names sources), verify it, join
    features with labels per split, and explore the result.

    Args:
        spec: the sources tried in order, pins for files without built-in hashes, and the
            sample grid's size and seed.
        cache_dir: where verified files and tables are kept (default $MLPAINT_CACHE_DIR or
            ~/.cache/mlpaint).
    """
    spec = spec or IngestSpec()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    fetched = fetch_mnist_files(spec.sources, spec.sha256, cache)
    fingerprint = dataset_fingerprint(fetched)
    tables = {split: join_split_table.submit(files, cache) for split, files in fetched.items()}
    return explore_dataset({split: future.result() for split, future in tables.items()},
                           fingerprint, cache / "reports" / fingerprint[:16],
                           spec.samples_per_label, spec.seed)
