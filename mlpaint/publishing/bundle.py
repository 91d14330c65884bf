"""The published bundle: a model plus everything serving needs, verifiable file by file.

Layout under a destination root (a folder or `s3://bucket/prefix`):

    LATEST                        the version serving should load (written last, atomically)
    history/<when>-<version>.json one per move of LATEST: when, from what, to what, why
                                  (the gate's reason or the rollback's), forced or not, by whom
    versions/<version>/
        bundle.json               model version, run id, algorithm, labels, metrics, data
                                  fingerprint, creation time, gallery sizes
        model/model.json          the DigitModel's card, the one record of what the model
                                  reads (its feature stage) and how its boosters combine
        model/booster-<i>.txt     LightGBM boosters
        explanations/mean_contributions.npy       (10, 784) float32
        explanations/mean_abs_contributions.npy   (10, 784) float32
        explanations/mean_contributions.png, mean_abs_contributions.png
        gallery/gallery.npz       test digits with scores and full per-class contributions
        manifest.json             SHA-256 and size of every other file (written last)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mlpaint.data.integrity import IntegrityError
from mlpaint.storage import manifest as manifests
from mlpaint.storage.manifest import MANIFEST
from mlpaint.storage.stores import LocalStore, ObjectStore, store_for

logger = logging.getLogger(__name__)

# 2: the feature stage is read from the model's own card, no longer from bundle.json.
BUNDLE_FORMAT_VERSION = 2
LATEST = "LATEST"
VERSIONS = "versions"
HISTORY = "history"
#: The lock a destination's publishers and rollbacks take: reading the champion, moving
#: LATEST and the registry's alias, and recording why, as one critical section.
PUBLISH_LOCK = "publish"
#: Seconds to wait after uploading a bundle and before flipping LATEST. Zero in production;
#: the atomicity test sets it to kill a publisher at exactly that point.
PAUSE_BEFORE_POINTER_ENV = "MLPAINT_FAULT_PAUSE_BEFORE_POINTER"


class BundleIntegrityError(IntegrityError):
    """A bundle file is missing, altered or incomplete; the message names it."""


@dataclass(frozen=True)
class BundleInfo:
    version: str
    model_name: str
    model_version: str
    mlflow_run_id: str
    algorithm: str
    labels: list[str]
    metrics: dict[str, float]
    data_fingerprint: dict[str, str]
    created_at: str
    gallery: dict = field(default_factory=dict)
    format_version: int = BUNDLE_FORMAT_VERSION


def bundle_version_id(model_version: str, created: float) -> str:
    """Sortable by time: `20261125T160000Z-v3`."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(created)) + f"-v{model_version}"


def write_manifest(folder: Path) -> dict:
    """The bundle's manifest: the catalog's, with the bundle format's version."""
    return manifests.write_manifest(folder, format_version=BUNDLE_FORMAT_VERSION)


def verify_bundle(folder: Path) -> dict:
    """Check every file the manifest names; a missing or altered file raises, naming it."""
    try:
        return manifests.verify_folder(folder)
    except IntegrityError as exc:
        raise BundleIntegrityError(str(exc)) from exc


# --- pointer, upload, pruning, download -------------------------------------------------

def read_latest(store: ObjectStore) -> str | None:
    data = store.get_bytes(LATEST)
    return data.decode().strip() if data else None


@dataclass(frozen=True)
class LatestChange:
    """Why LATEST moves, recorded beside it."""

    action: str  # "publish" or "rollback"
    reason: str
    by: str  # who moved it: a flow run (and its deployment) or a command and its user
    forced: bool = False
    model_version: str | None = None


def local_user() -> str:
    """`user@host` of this process: who moved LATEST when no deployment did."""
    import getpass
    import socket

    return f"{getpass.getuser()}@{socket.gethostname()}"


@dataclass(frozen=True)
class HistoryEntry:
    at: str  # UTC, ISO 8601 with milliseconds
    bundle_version: str  # what LATEST named from then on
    previous: str | None  # what it named before
    action: str
    reason: str
    by: str
    forced: bool
    model_version: str | None

    def to_json(self) -> dict:
        return asdict(self)


def record_latest_move(store: ObjectStore, version: str, previous: str | None,
                       change: LatestChange) -> HistoryEntry:
    """Append the move of LATEST to `version` to the destination's history: one new object,
    named so that names sort as the moves happened; nothing is ever rewritten."""
    now = time.time()
    whole, millis = time.gmtime(now), f".{int(now * 1000) % 1000:03d}Z"
    stamp = time.strftime("%Y%m%dT%H%M%S", whole) + millis
    entry = HistoryEntry(at=time.strftime("%Y-%m-%dT%H:%M:%S", whole) + millis,
                         bundle_version=version,
                         previous=previous, action=change.action, reason=change.reason,
                         by=change.by, forced=change.forced, model_version=change.model_version)
    store.create(f"{HISTORY}/{stamp}-{version}.json",
                 json.dumps(entry.to_json(), sort_keys=True).encode())
    return entry


def latest_history(store: ObjectStore) -> list[HistoryEntry]:
    """Every recorded move of LATEST at the destination, oldest first."""
    entries = []
    for key in sorted(k for k in store.list_keys(HISTORY) if k.endswith(".json")):
        data = store.get_bytes(key)
        if data is not None:
            entries.append(HistoryEntry(**json.loads(data)))
    return entries


@dataclass(frozen=True)
class PublishResult:
    uri: str
    version: str
    latest: str | None  # what LATEST names after publishing
    promoted: bool
    pruned: list[str]


def publish_bundle(staging: Path, store: ObjectStore, version: str, *, promote: bool,
                   retention: int, change: LatestChange | None = None) -> PublishResult:
    """Upload a built bundle under `versions/<version>/`, verify every byte that landed, and
    only then, if promoted, point LATEST at it and record why (`change`) in the history.
    Readers that follow LATEST never see a half-published bundle; a publisher killed mid-way
    leaves LATEST where it was."""
    manifest = verify_bundle(staging)
    prefix = f"{VERSIONS}/{version}"
    for name in sorted(manifest["files"]):
        store.put_file(f"{prefix}/{name}", staging / name)
    store.put_file(f"{prefix}/{MANIFEST}", staging / MANIFEST)  # last: marks the upload whole
    for name, expected in manifest["files"].items():
        landed = store.get_bytes(f"{prefix}/{name}")
        if landed is None or hashlib.sha256(landed).hexdigest() != expected["sha256"]:
            raise BundleIntegrityError(f"{store.describe(prefix + '/' + name)}: upload did not "
                                       "land intact")
    if pause := float(os.environ.get(PAUSE_BEFORE_POINTER_ENV, "0") or 0):
        logger.warning("pausing %.1f s before flipping LATEST (%s is set)", pause,
                       PAUSE_BEFORE_POINTER_ENV)
        time.sleep(pause)
    if promote:
        previous = read_latest(store)
        store.put_bytes(LATEST, (version + "\n").encode())
        record_latest_move(store, version, previous,
                           change or LatestChange("publish", "promoted", by="unknown"))
    latest = read_latest(store)
    pruned = prune_versions(store, retention=retention, keep={latest, version} - {None})
    return PublishResult(store.describe(), version, latest, promote, pruned)


def prune_versions(store: ObjectStore, *, retention: int, keep: set[str]) -> list[str]:
    """Delete all but the newest `retention` versions, never one in `keep`."""
    versions = store.list_folders(VERSIONS)
    doomed = [v for v in versions[:-retention] if v not in keep] if retention > 0 else []
    for version in doomed:
        store.delete_prefix(f"{VERSIONS}/{version}")
    return doomed


# --- loading ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadedBundle:
    folder: Path
    info: BundleInfo
    manifest: dict

    def model(self):
        from mlpaint.training.algorithms import DigitModel

        return DigitModel.load(self.folder / "model")

    def array(self, relative: str) -> np.ndarray:
        return np.load(self.folder / relative)

    def gallery(self) -> dict[str, np.ndarray]:
        with np.load(self.folder / "gallery" / "gallery.npz") as data:
            return {key: data[key] for key in data.files}


def _download_version(store: ObjectStore, version: str, destination: Path) -> Path:
    """Download one version into `destination` and verify it. Several processes may fetch the
    same version at once (each worker of `mlpaint serve --workers N` loads the bundle itself),
    so each writes its own staging folder and renames it into place; one that finds the
    version already placed by another keeps that copy once it verifies (a version's files
    never change once published)."""
    prefix = f"{VERSIONS}/{version}"
    manifest_bytes = store.get_bytes(f"{prefix}/{MANIFEST}")
    if manifest_bytes is None:
        raise BundleIntegrityError(f"{store.describe(prefix)}: no {MANIFEST} (incomplete "
                                   "bundle)")
    manifest = json.loads(manifest_bytes)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{destination.name}.partial-",
                                    dir=destination.parent))
    try:
        for name in manifest["files"]:
            data = store.get_bytes(f"{prefix}/{name}")
            if data is None:
                raise BundleIntegrityError(f"{store.describe(prefix + '/' + name)}: missing "
                                           "from the bundle")
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        (staging / MANIFEST).write_bytes(manifest_bytes)
        verify_bundle(staging)
        try:
            staging.rename(destination)
        except OSError:  # already there: placed by a sibling process, or left from a past run
            if not _holds_verified_copy(destination, manifest_bytes):
                shutil.rmtree(destination, ignore_errors=True)
                staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def _holds_verified_copy(folder: Path, manifest_bytes: bytes) -> bool:
    """Whether `folder` holds exactly the bundle this manifest describes, every file intact."""
    try:
        return (folder / MANIFEST).read_bytes() == manifest_bytes and bool(verify_bundle(folder))
    except (OSError, BundleIntegrityError):
        return False


def _is_version_folder(store: ObjectStore) -> bool:
    """A local folder holding one version's files (its own manifest), not a destination root."""
    return isinstance(store, LocalStore) and (store.root / MANIFEST).is_file()


def current_pointer(uri: str) -> str | None:
    """The version LATEST names at `uri`; None where there is no pointer to follow: a
    registry reference (resolved once, when loaded) or one version's folder."""
    if uri.startswith("models:/"):
        return None
    store = store_for(uri)
    return None if _is_version_folder(store) else read_latest(store)


def load_bundle(uri: str, *, version: str | None = None, cache_dir: Path | None = None
                ) -> LoadedBundle:
    """Load and verify a bundle: a folder (a destination root, following LATEST, or one
    version's folder), `s3://bucket/prefix` (following LATEST), or `models:/name@alias` /
    `models:/name/N` (the bundle the registry's model version was published to). Every file
    is checked against the manifest before anything is returned."""
    if uri.startswith("models:/"):
        root, version = bundle_of_registered_model(uri)
        return load_bundle(root, version=version, cache_dir=cache_dir)
    store = store_for(uri)
    if _is_version_folder(store) and version is None:
        folder = store.root
    else:
        version = version or read_latest(store)
        if not version:
            raise BundleIntegrityError(f"{store.describe(LATEST)}: no LATEST pointer")
        if isinstance(store, LocalStore):
            folder = store.root / VERSIONS / version
        else:
            from mlpaint.data.integrity import default_cache_dir

            store_key = hashlib.sha256(store.describe().encode()).hexdigest()[:16]
            destination = (cache_dir or default_cache_dir()) / "bundles" / store_key / version
            folder = _download_version(store, version, destination)
    manifest = verify_bundle(folder)
    data = json.loads((folder / "bundle.json").read_text())
    if data.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleIntegrityError(
            f"{folder / 'bundle.json'}: bundle format {data.get('format_version')}, this "
            f"mlpaint serves {BUNDLE_FORMAT_VERSION}; publish the model again")
    return LoadedBundle(folder, BundleInfo(**data), manifest)


BUNDLE_ROOT_TAG = "mlpaint.bundle_root"
BUNDLE_VERSION_TAG = "mlpaint.bundle_version"


def info_json(info: BundleInfo) -> str:
    return json.dumps(asdict(info), indent=1, sort_keys=True)


def bundle_of_registered_model(uri: str) -> tuple[str, str]:
    """The bundle destination and version a published registered version (`models:/name/N`
    or `models:/name@alias`) was published as, from the tags `record_decision`
    (mlpaint.tracking.publication) set on it."""
    from mlpaint.tracking.store import resolve_tracking_uri, tracking_client

    reference = uri.removeprefix("models:/")
    client = tracking_client(resolve_tracking_uri())
    if "@" in reference:
        name, alias = reference.split("@", 1)
        model_version = client.get_model_version_by_alias(name, alias)
    else:
        name, number = reference.rsplit("/", 1)
        model_version = client.get_model_version(name, number)
    tags = model_version.tags
    if BUNDLE_ROOT_TAG not in tags:
        raise BundleIntegrityError(f"{uri}: model version {model_version.version} has no "
                                   "published bundle (run `mlpaint publish`)")
    return tags[BUNDLE_ROOT_TAG], tags[BUNDLE_VERSION_TAG]
