"""Where every artefact mlpaint makes lives, in one module.

Two places hold things:

- **The store** (`Catalog.store`): a folder, or `s3://bucket/prefix` (boto3, honouring
  `AWS_ENDPOINT_URL`), chosen by `--store URI` or `$MLPAINT_STORE`. Training artefacts live
  under it, each a folder written whole with its `manifest.json` (`mlpaint.storage.manifest`):

  | area          | what                                                  | written by          |
  |---------------|-------------------------------------------------------|---------------------|
  | `tables/`     | MNIST splits joined with their labels (remote stores) | the training flow   |
  | `features/`   | a split through the feature stage                     | prepare-features    |
  | `augmented/`  | augmented copies of a split's rows                    | prepare-augmented   |
  | `feedback-matrices/` | a feedback snapshot: training part, wild set | prepare-feedback |
  | `fits/`       | one finished fit: model, scores (`fit.json`)          | train-fold / -final |
  | `base-models/` | a registered model a warm start continues            | prepare-warm-start  |

  With `$MLPAINT_STORE` set, published bundles default to `<store>/bundles` and the feedback
  store to `<store>/feedback` (see `default_bundle_destination`, `default_feedback_store`).
  Without it the store is the cache folder itself, and bundles go to `.mlpaint/bundles`.
- **This machine's cache** (`default_cache_dir()`, `--cache-dir`): fetched source files,
  tables, reports, per-run work areas, built bundles, and local copies of a remote store's
  folders (`mirror/`), each verified against its manifest when first read.

Tasks hand each other the *URIs* of finished folders (small frozen references), never paths
only one machine can read: any process resolves one with `local_folder`, through its own
cache. So a Dask worker on another machine, with its own cache and no view of the flow's,
reads what the flow wrote and writes what the flow reads.

MLflow's locations (tracking store, artifacts) are in `mlpaint.tracking.store`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mlpaint.data.integrity import IntegrityError, default_cache_dir
from mlpaint.storage.manifest import (
    MANIFEST,
    check_files,
    is_whole,
    parse_manifest,
    remember_verified,
    verify_folder_once,
    write_manifest,
)
from mlpaint.storage.stores import sibling_uri, store_for

logger = logging.getLogger(__name__)

LOCAL_STORE_DIR = ".mlpaint"
STORE_ENV = "MLPAINT_STORE"
BUNDLE_DIR_ENV = "MLPAINT_BUNDLE_DIR"
FEEDBACK_STORE_ENV = "MLPAINT_FEEDBACK_STORE"
FEEDBACK_OFF = "off"


def default_bundle_destination(store: str | None = None) -> str:
    """`bundles` in `store` when one is given, else `$MLPAINT_BUNDLE_DIR`, else `bundles` in
    `$MLPAINT_STORE`, else `.mlpaint/bundles` under the working directory."""
    if store:
        return join_uri(store, "bundles")
    if explicit := os.environ.get(BUNDLE_DIR_ENV):
        return explicit
    if store := os.environ.get(STORE_ENV):
        return join_uri(store, "bundles")
    return str(Path.cwd() / LOCAL_STORE_DIR / "bundles")


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
STAGED_CACHE_FOLDERS = ("tables", "features", "augmented", "feedback-matrices",
                        "pen-matrices", "fits", "base-models", "mirror")
#: Built bundles, kept for a retry or rerun of the same publication only.
BUILT_BUNDLES = "built-bundles"
#: Cache folders whose entries serve one run and its retries: per-run work areas (`publish`
#: is where older versions kept them) and built bundles.
WORK_FOLDERS = ("work", "publish", BUILT_BUNDLES)
#: A staging folder or work area untouched this long belongs to a run that was killed
#: outright: no fit or publication runs for a day.
STALE_AFTER_SECONDS = 24 * 3600


def place_in_cache(staging: Path, folder: Path, *, marker: str) -> bool:
    """Rename a finished staging folder into its cache place, whole. A concurrent run that
    computed the same content first wins (its `marker` file is there): its copy is kept and
    ours dropped. Whether ours was placed."""
    try:
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / marker).is_file():
            raise
        return False
    return True


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


# --- the store: finished folders by URI --------------------------------------------------------

#: The store's areas (see the table at the top).
TABLES, FEATURES, AUGMENTED, FEEDBACK_MATRICES, PEN_MATRICES, FITS, BASE_MODELS = (
    "tables", "features", "augmented", "feedback-matrices", "pen-matrices", "fits",
    "base-models")


def is_remote(uri: str) -> bool:
    return urlsplit(uri).scheme == "s3"


def join_uri(base: str, *parts: str) -> str:
    """`base/part/…` for a folder or an `s3://` prefix alike."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base).expanduser().joinpath(*parts))


def uri_name(uri: str) -> str:
    """The last segment of a location: a finished folder's content key."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def mirror_folder(uri: str) -> Path:
    """Where this machine keeps its copy of a remote folder: under its own cache
    (`$MLPAINT_CACHE_DIR`), whichever process asks, so a worker never needs the flow's."""
    parts = urlsplit(uri)
    return default_cache_dir() / "mirror" / parts.netloc / parts.path.strip("/")


@dataclass(frozen=True)
class Catalog:
    """The store finished folders go to (`store`), and the flow's machine's cache
    (`cache_dir`: its source data, tables and work areas). Folders are staged beside a local
    store's destination, or in the mirror of whichever process writes to a remote one: a
    worker never uses `cache_dir`, which names a folder on the flow's machine.

    Built once from settings (`from_settings`) and handed to every task that writes; a
    frozen, picklable value, so a Dask worker on another machine gets the same one."""

    store: str
    cache_dir: str

    @classmethod
    def from_settings(cls, store: str | None = None,
                      cache_dir: str | Path | None = None) -> Catalog:
        """`store`, else `$MLPAINT_STORE`, else the cache folder itself (`cache_dir`, else
        `default_cache_dir()`)."""
        cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        chosen = store or os.environ.get(STORE_ENV) or str(cache)
        store_for(chosen)  # a malformed URI fails here, before any work
        return cls(chosen if is_remote(chosen) else str(Path(chosen).expanduser().resolve()),
                   str(cache))

    @property
    def remote(self) -> bool:
        return is_remote(self.store)

    def location(self, area: str, key: str) -> str:
        """The URI of the finished folder `key` in `area`."""
        return join_uri(self.store, area, key)

    def _local_place(self, uri: str) -> Path:
        """Where this machine holds the folder at `uri`: itself, or its mirror copy."""
        return mirror_folder(uri) if self.remote else Path(uri)

    def is_finished(self, uri: str) -> bool:
        """Whether a whole folder is at `uri` (its manifest, written last, is there)."""
        if self.remote:
            return store_for(uri).get_bytes(MANIFEST) is not None
        return (Path(uri) / MANIFEST).is_file()

    @contextlib.contextmanager
    def staging(self, uri: str) -> Iterator[Path]:
        """A fresh local folder to build the folder for `uri` in; publish it with `finish`.
        Local stores stage beside the destination (a rename then places it), remote ones in
        this machine's mirror. Whatever is left of it is removed when the block ends."""
        final = self._local_place(uri)
        final.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def finish(self, staging: Path, uri: str) -> Path:
        """Publish a built folder at `uri`, whole: its manifest (every file's SHA-256) is
        written last, so no reader takes a half-written folder for a finished one. A
        concurrent writer of the same content that finished first wins. Returns this
        machine's copy, ready to read."""
        manifest = write_manifest(staging)
        final = self._local_place(uri)
        if self.remote:
            store = store_for(uri)
            for name in manifest["files"]:
                store.put_file(name, staging / name)
            store.put_bytes(MANIFEST, (staging / MANIFEST).read_bytes())
        if place_in_cache(staging, final, marker=MANIFEST):
            # Hashed just now, by this process: its first reader here need not hash it
            # again (hashing the training features lies on the way to the first fit).
            remember_verified(final)
        return final

    def remove(self, uri: str) -> None:
        """Drop a damaged finished folder so it is built again (never used on data people
        gave: the feedback store is append-only and lives elsewhere)."""
        if self.remote:
            store_for(uri).delete_prefix("")
        shutil.rmtree(self._local_place(uri), ignore_errors=True)

    def share_folder(self, local: Path, area: str) -> str:
        """A URI any worker can read for a folder only this machine has (a joined table in
        the cache): the folder itself when it is inside a local store; otherwise a copy
        published under `area` with the same trailing path, once."""
        if not self.remote and local.resolve().is_relative_to(self.store):
            return str(local)
        uri = self.location(area, "/".join(local.parts[-2:]))
        if not self.is_finished(uri):
            with self.staging(uri) as staging:
                shutil.copytree(local, staging, dirs_exist_ok=True)
                self.finish(staging, uri)
        return uri


def local_folder(uri: str) -> Path:
    """This machine's verified copy of the finished folder at `uri`: a local store's folder
    itself, or a remote folder downloaded once into the mirror. Every file is checked
    against the manifest the writer recorded (once per process and manifest), so a damaged
    or half-copied artefact raises `IntegrityError` instead of training or being served.
    A local folder without a manifest (written before folders had one) is taken as it is."""
    if not is_remote(uri):
        folder = Path(uri)
        if not is_whole(folder):
            if not folder.is_dir():
                raise FileNotFoundError(f"{uri}: no such folder")
            return folder
        return verify_folder_once(folder, uri)
    folder = mirror_folder(uri)
    if is_whole(folder):
        try:
            return verify_folder_once(folder, uri)
        except IntegrityError:
            logger.warning("%s: the local copy is damaged; downloading it again", folder)
            shutil.rmtree(folder, ignore_errors=True)
    store = store_for(uri)
    manifest = store.get_bytes(MANIFEST)
    if manifest is None:
        raise FileNotFoundError(f"{uri}: no finished folder there (no {MANIFEST})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    parsed = parse_manifest(manifest, uri)
    try:
        for name in parsed["files"]:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            if not store.get_file(name, staging / name):
                raise IntegrityError(f"{uri}/{name}: missing (listed in its {MANIFEST})")
        (staging / MANIFEST).write_bytes(manifest)
        check_files(staging, parsed, uri)
        place_in_cache(staging, folder, marker=MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("%s: downloaded to %s", uri, folder)
    return verify_folder_once(folder, uri)
