"""Where mlpaint keeps things by default, in one place.

Everything lives under `.mlpaint/` in the working directory unless a setting says otherwise,
so `make run` on a fresh clone needs no configuration and leaves nothing elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mlpaint.storage import sibling_uri

LOCAL_STORE_DIR = ".mlpaint"
BUNDLE_DIR_ENV = "MLPAINT_BUNDLE_DIR"
FEEDBACK_STORE_ENV = "MLPAINT_FEEDBACK_STORE"
FEEDBACK_OFF = "off"


def default_bundle_destination() -> str:
    """`$MLPAINT_BUNDLE_DIR`, else `.mlpaint/bundles` under the working directory."""
    return os.environ.get(BUNDLE_DIR_ENV) or str(Path.cwd() / LOCAL_STORE_DIR / "bundles")


def default_feedback_store(bundle_uri: str | None = None) -> str:
    """`$MLPAINT_FEEDBACK_STORE`, else a `feedback` folder (or prefix) beside the bundle
    destination a server follows; for a registry URI (`models:/…`) or none, beside the
    default bundle destination."""
    if os.environ.get(FEEDBACK_STORE_ENV):
        return os.environ[FEEDBACK_STORE_ENV]
    if bundle_uri is None or bundle_uri.startswith("models:/"):
        bundle_uri = default_bundle_destination()
    return sibling_uri(bundle_uri, "feedback")


def feedback_store_option(value: str | None, bundle_uri: str | None = None) -> str | None:
    """A `--feedback-store` value as a location, or None for `off`."""
    if value is not None and value.strip().lower() == FEEDBACK_OFF:
        return None
    return value or default_feedback_store(bundle_uri)


# --- work areas in the cache -----------------------------------------------------------------

#: Cache folders whose entries are built in hidden staging folders (`.<key>.<random>`) and
#: renamed into place when whole.
STAGED_CACHE_FOLDERS = ("tables", "features", "augmented", "feedback", "fits")
#: Built bundles, kept for a retry or rerun of the same publication only.
BUILT_BUNDLES = "built-bundles"
#: Cache folders whose entries serve one run and its retries: per-run work areas (`publish`
#: is where older versions kept them) and built bundles.
WORK_FOLDERS = ("work", "publish", BUILT_BUNDLES)
#: A staging folder or work area untouched this long belongs to a run that was killed
#: outright: no fit or publication runs for a day.
STALE_AFTER_SECONDS = 24 * 3600


def place_in_cache(staging: Path, folder: Path, *, marker: str) -> None:
    """Rename a finished staging folder into its cache place, whole. A concurrent run that
    computed the same content first wins (its `marker` file is there): its copy is kept and
    ours dropped."""
    try:
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / marker).is_file():
            raise


@contextlib.contextmanager
def work_area(cache_dir: Path, name: str) -> Iterator[Path]:
    """A folder of this run's own under `<cache>/work/`, removed when the block ends, however
    it ends, so runs at once never share one and finished or failed runs leave nothing."""
    parent = cache_dir / "work"
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep_stale_work(cache_dir: Path, older_than_s: float = STALE_AFTER_SECONDS) -> list[Path]:
    """Remove what runs killed outright left in the cache (their hook-less deaths skip
    `work_area`'s cleanup): staging folders and work areas not modified for `older_than_s`.
    What was removed."""
    now, removed = time.time(), []
    candidates = [entry for name in STAGED_CACHE_FOLDERS if (cache_dir / name).is_dir()
                  for entry in (cache_dir / name).rglob(".*") if entry.is_dir()]
    candidates += [entry for name in WORK_FOLDERS if (cache_dir / name).is_dir()
                   for entry in (cache_dir / name).iterdir()]
    for entry in candidates:
        try:
            if now - entry.stat().st_mtime < older_than_s:
                continue
        except FileNotFoundError:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
