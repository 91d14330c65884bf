"""Hashes, pins, atomic writes and the content-addressed cache.

Nothing reaches the cache unverified by accident: a blob is stored under the SHA-256 of its
bytes, written to a temporary file first and renamed into place, so a killed process never
leaves something that looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mlpaint.data.pins import PINNED_SHA256

logger = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class IntegrityError(Exception):
    """A file's bytes do not match the hash pinned for it."""


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def parse_sha256_pins(values: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Parse `NAME=HEX` command-line pins.

    NAME is a file name as it lies at the source. `x.gz` pins the compressed bytes, `x` the
    decompressed bytes, so both `sha256sum x.gz` and `zcat x.gz | sha256sum` work.
    """
    pins: dict[str, str] = {}
    for value in values:
        name, sep, hexdigest = value.partition("=")
        name, hexdigest = name.strip(), hexdigest.strip().lower()
        if not sep or not name:
            raise ValueError(f"--sha256 {value!r}: expected NAME=HEX, e.g. train.csv=ab12…")
        if not _HEX64.match(hexdigest):
            raise ValueError(f"--sha256 {value!r}: HEX must be 64 hexadecimal digits")
        if "/" in name:
            raise ValueError(f"--sha256 {value!r}: NAME is a file name, not a path")
        pins[name] = hexdigest
    return pins


@dataclass(frozen=True)
class Pins:
    """Known-good hashes by file name: the built-in MNIST pins, overridden by the user's."""

    user: Mapping[str, str] = field(default_factory=dict)

    def for_name(self, name: str) -> str | None:
        if name in self.user:
            return self.user[name]
        return PINNED_SHA256.get(name)

    def is_user_pinned(self, name: str) -> bool:
        return name in self.user


@contextmanager
def scratch_path(directory: Path, label: str) -> Iterator[Path]:
    """Yield a fresh temporary path in `directory`; whatever is left there is removed on exit
    (a file moved into the cache meanwhile is not left behind, a failed one is cleaned up)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{label}.", suffix=".partial", dir=directory)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
    finally:
        tmp_path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; rename it into place only on success."""
    with scratch_path(destination.parent, destination.name) as tmp_path:
        yield tmp_path
        _fsync(tmp_path)
        tmp_path.chmod(0o644)  # mkstemp makes files private; what we publish is for reading
        tmp_path.replace(destination)


@contextmanager
def atomic_folder(folder: Path, *, marker: str) -> Iterator[Path]:
    """Yield a private staging folder beside `folder`; on success rename it into place, whole.

    Folders written this way are cached under a key of what they were built from, so one
    already there holds the same content: when a concurrent run placed it first (its
    `marker` file is there), theirs is kept (it may be memory-mapped by that run right now)
    and ours dropped."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        yield staging
        staging.rename(folder)
    except OSError:
        if not (folder / marker).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class BlobCache:
    """Files stored under `root/blobs/sha256/ab/abcdef…`, named by the hash of their bytes."""

    root: Path

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def scratch_dir(self) -> Path:
        path = self.root / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lookup(self, sha256: str) -> Path | None:
        """The cached blob with this hash, re-verified; a corrupt blob is evicted."""
        path = self.blob_path(sha256)
        if not path.is_file():
            return None
        actual = sha256_file(path)
        if actual != sha256:
            logger.warning("cache blob %s is corrupt (hash %s); evicting it", path, actual)
            path.unlink(missing_ok=True)
            return None
        return path

    def store(self, source_path: Path, sha256: str) -> Path:
        """Move an already-verified file into the cache under its hash. The file is synced
        first and renamed in one step, so a crash leaves either nothing or the whole blob."""
        destination = self.blob_path(sha256)
        destination.parent.mkdir(parents=True, exist_ok=True)
        _fsync(source_path)
        source_path.replace(destination)
        return destination


def default_cache_dir() -> Path:
    """`$MLPAINT_CACHE_DIR`, else `$XDG_CACHE_HOME/mlpaint`, else `~/.cache/mlpaint`."""
    if explicit := os.environ.get("MLPAINT_CACHE_DIR"):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlpaint"
