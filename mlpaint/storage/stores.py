"""Object stores: a local folder or an S3 prefix, behind one small interface.

Every location mlpaint writes outside MLflow (published bundles, the feedback store) is a URI
naming a folder or `s3://bucket/prefix`. Both kinds go through the same calls, so code that
works on a laptop's folder works unchanged on S3, MinIO or moto (`AWS_ENDPOINT_URL`).

Guarantees both kinds keep:
- `put_bytes`/`put_file` replace an object whole: a reader sees the old or the new bytes;
- `create` writes an object only if its key is free, atomically, and never overwrites: of
  two concurrent creators of one key exactly one wins, which is what makes a
  content-addressed store safe to append to from many processes;
- `lock(name)` is a critical section shared by every process using the store, on any
  machine: the publishing gate's read-compare-flip runs under it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from mlpaint.data.integrity import atomic_path, scratch_path

logger = logging.getLogger(__name__)

LOCKS_FOLDER = ".locks"
# How long a waiter waits for a lock before giving up, and how long an S3 lease lasts: a
# publisher that died holding one blocks the next for at most this long. Both are far above
# the few tens of seconds a gate and an upload take.
LOCK_TIMEOUT_S = 900.0
LEASE_SECONDS = 900.0
_LOCK_POLL_S = 0.5


class ObjectStore(Protocol):
    def describe(self, key: str = "") -> str: ...

    def get_bytes(self, key: str) -> bytes | None: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, local: Path) -> None: ...

    def get_file(self, key: str, local: Path) -> bool: ...

    def create(self, key: str, data: bytes) -> bool: ...

    def list_keys(self, prefix: str) -> list[str]: ...

    def list_folders(self, prefix: str) -> list[str]: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def check_writable(self) -> None: ...

    def lock(self, name: str,
             timeout_s: float = LOCK_TIMEOUT_S) -> contextlib.AbstractContextManager[None]: ...


class StoreUnavailableError(OSError):
    """A store that cannot be reached or written: the message says which and why."""


class LockTimeoutError(TimeoutError):
    """Another process held a store's lock for longer than this one would wait."""


def _lock_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_linkat_refused = threading.Event()


@functools.cache
def _linkat() -> Callable[..., int] | None:
    """libc's linkat(2), or None where there is none to call (not Linux)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "O_TMPFILE"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).linkat
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_int]
    return function


def _create_unnamed_then_link(destination: Path, data: bytes) -> bool | None:
    """`LocalStore.create` in two steps: the bytes written and fsynced to a file with no name
    yet (open(2) with O_TMPFILE), which then gets its name with linkat(2). Like link(2),
    linkat fails when the name is taken, so the first writer wins; unlike a named scratch
    file, there is nothing to remove afterwards, nor to leave behind if the process dies.
    That is fewer file system calls than the scratch file's, on a path every feedback post
    takes. None where the kernel, the file system or the process's privileges do not allow
    it (linkat with AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH before Linux 6.10): the caller
    then uses a named scratch file."""
    linkat = _linkat()
    if linkat is None or _linkat_refused.is_set():
        return None
    folder = destination.parent
    try:
        descriptor = os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
        return _create_unnamed_then_link(destination, data)
    except OSError:  # EOPNOTSUPP, EISDIR: no O_TMPFILE on this file system
        return None
    try:
        with os.fdopen(descriptor, "wb", closefd=False) as handle:
            handle.write(data)
        os.fchmod(descriptor, 0o644)  # readable by all whatever the umask, as scratch files are
        os.fsync(descriptor)
        if linkat(descriptor, b"", _AT_FDCWD, os.fsencode(destination), _AT_EMPTY_PATH) == 0:
            return True
        error = ctypes.get_errno()
        if error == errno.EEXIST:
            return False
        if error in (errno.EPERM, errno.ENOENT, errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL):
            # Not allowed to this process: remembered, so later creates do not write twice.
            _linkat_refused.set()
            return None
        raise OSError(error, os.strerror(error), str(destination))
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class LocalStore:
    root: Path

    def describe(self, key: str = "") -> str:
        return str(self.root / key)

    def get_bytes(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def put_bytes(self, key: str, data: bytes) -> None:
        with atomic_path(self.root / key) as tmp:
            tmp.write_bytes(data)

    def put_file(self, key: str, local: Path) -> None:
        with atomic_path(self.root / key) as tmp:
            shutil.copyfile(local, tmp)

    def get_file(self, key: str, local: Path) -> bool:
        """Copy the object to `local`; False if there is none."""
        try:
            shutil.copyfile(self.root / key, local)
        except FileNotFoundError:
            return False
        return True

    def create(self, key: str, data: bytes) -> bool:
        destination = self.root / key
        created = _create_unnamed_then_link(destination, data)
        if created is not None:
            return created
        with scratch_path(destination.parent, destination.name) as tmp:
            with tmp.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.chmod(0o644)
            # link(2), unlike rename(2), fails when the name is taken: the first writer wins
            # and nobody's bytes are replaced. The scratch file is removed either way.
            try:
                os.link(tmp, destination)
            except FileExistsError:
                return False
        return True

    def list_keys(self, prefix: str) -> list[str]:
        folder = self.root / prefix
        if not folder.is_dir():
            return []
        return sorted(str(path.relative_to(self.root)) for path in folder.rglob("*")
                      if path.is_file() and not path.name.startswith("."))

    def list_folders(self, prefix: str) -> list[str]:
        folder = self.root / prefix
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)

    def check_writable(self) -> None:
        """Create the folder if needed; raise if it cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(f"{self.root}: cannot create the folder ({exc})") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreUnavailableError(f"{self.root}: not writable by this user")

    @contextlib.contextmanager
    def lock(self, name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """An OS file lock (flock) beside the folder's contents: the kernel releases it when
        its holder dies, however it dies, so no stale lock is ever left behind."""
        from filelock import FileLock, Timeout

        path = self.root / LOCKS_FOLDER / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(blocking=False)
        except Timeout:
            logger.info("%s: held by another process; waiting up to %.0f s", path, timeout_s)
            try:
                lock.acquire(timeout=timeout_s)
            except Timeout as exc:
                raise LockTimeoutError(f"{path}: held by another process for over "
                                       f"{timeout_s:.0f} s") from exc
        try:
            yield
        finally:
            lock.release()


@dataclass(frozen=True)
class S3Store:
    """boto3 against S3 or any S3-compatible store (`AWS_ENDPOINT_URL`). A PUT replaces an
    object whole, so no reader sees one half-written; `create` is a conditional PUT
    (`If-None-Match: *`), which S3, MinIO and moto honour."""

    bucket: str
    prefix: str

    def _key(self, key: str) -> str:
        return f"{self.prefix.strip('/')}/{key}".strip("/")

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _client(self):
        from mlpaint.data.transports import make_s3_client

        return make_s3_client(unsigned=False)

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self._client().get_object(Bucket=self.bucket,
                                             Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, local: Path) -> None:
        self._client().upload_file(str(local), self.bucket, self._key(key))

    def get_file(self, key: str, local: Path) -> bool:
        """Download the object to `local` (in parts, in parallel, for large ones); False if
        there is none."""
        from botocore.exceptions import ClientError

        try:
            self._client().download_file(self.bucket, self._key(key), str(local))
        except ClientError as exc:
            if _is_missing(exc):  # download_file's HEAD answers a bare 404
                return False
            raise
        return True

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                      IfNoneMatch="*")
        except ClientError as exc:
            if _is_precondition_failure(exc):  # the key exists, or is being created
                return False
            raise
        return True

    def _pages(self, prefix: str, **kwargs):
        folder = self._key(prefix)
        paginator = self._client().get_paginator("list_objects_v2")
        yield from paginator.paginate(Bucket=self.bucket, Prefix=folder + "/" if folder else "",
                                      **kwargs)

    def list_keys(self, prefix: str) -> list[str]:
        base = self._key("")
        strip = len(base) + 1 if base else 0
        return sorted(item["Key"][strip:] for page in self._pages(prefix)
                      for item in page.get("Contents", []))

    def list_folders(self, prefix: str) -> list[str]:
        return sorted(entry["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                      for page in self._pages(prefix, Delimiter="/")
                      for entry in page.get("CommonPrefixes", []))

    def check_writable(self) -> None:
        """Raise unless the bucket answers to these credentials (writing needs no probe
        object: a store that is read this far is normally writable, and a denied PUT is
        reported per request)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client().head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StoreUnavailableError(f"{self.describe()}: bucket not reachable ({exc})") \
                from exc

    def delete_prefix(self, prefix: str) -> None:
        client = self._client()
        for page in self._pages(prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    @contextlib.contextmanager
    def lock(self, name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """A lease object taken with S3's conditional writes. It is created only if absent
        (`If-None-Match: *`); a lease past its expiry is taken over only by replacing the
        exact object seen (`If-Match` on its ETag), so of two waiters one wins; the holder
        deletes it on exit only if it is still its own. A holder that died leaves a lease
        that blocks others until it expires (`LEASE_SECONDS`)."""
        from botocore.exceptions import ClientError

        lease = f"{LOCKS_FOLDER}/{name}.lock"
        client, key, owner = self._client(), self._key(lease), _lock_owner()
        deadline = time.monotonic() + timeout_s
        waited = False
        while (etag := self._take_lease(client, lease, owner)) is None:
            if not waited:
                waited = True
                logger.info("%s: held by another process; waiting up to %.0f s",
                            self.describe(lease), timeout_s)
            if time.monotonic() > deadline:
                holder = _read_lease(self.get_bytes(lease)).get("owner", "another process")
                raise LockTimeoutError(f"{self.describe(lease)}: held by {holder} for over "
                                       f"{timeout_s:.0f} s")
            time.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            try:
                client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag)
            except ClientError as exc:
                if not _is_precondition_failure(exc):
                    raise
                logger.warning("%s: the lease expired and was taken over before this holder "
                               "finished", self.describe(lease))

    def _take_lease(self, client, lease: str, owner: str) -> str | None:
        """Create the lease, or take over an expired one; its ETag if this process holds it."""
        from botocore.exceptions import ClientError

        key = self._key(lease)
        body = json.dumps({"owner": owner, "expires_at": time.time() + LEASE_SECONDS}).encode()
        try:
            return client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                     IfNoneMatch="*")["ETag"]
        except ClientError as exc:
            if not _is_precondition_failure(exc):
                raise
        try:
            current = client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                return None  # released meanwhile: the next attempt creates it
            raise
        if _lease_expiry(current["Body"].read()) > time.time():
            return None
        try:
            taken = client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                      IfMatch=current["ETag"])["ETag"]
        except ClientError as exc:
            if not _is_precondition_failure(exc):
                raise
            return None
        logger.warning("%s: took over a lease that expired (its holder died or hung)",
                       self.describe(lease))
        return taken


def _read_lease(data: bytes | None) -> dict:
    """A lease object's fields; empty if it is gone or unreadable."""
    try:
        lease = json.loads(data) if data else {}
    except ValueError:
        return {}
    return lease if isinstance(lease, dict) else {}


def _lease_expiry(data: bytes) -> float:
    """When a lease expires; an unreadable one counts as expired rather than blocking
    forever."""
    try:
        return float(_read_lease(data).get("expires_at", 0.0))
    except (TypeError, ValueError):
        return 0.0


def _is_missing(exc) -> bool:
    return exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}


def _is_precondition_failure(exc) -> bool:
    """412 (the condition did not hold) or 409 (a concurrent conditional write is in flight):
    another writer got there first."""
    return exc.response.get("Error", {}).get("Code") in {
        "PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def store_for(uri: str) -> ObjectStore:
    """The store a URI names: `s3://bucket/prefix`, `file:///path` or a plain path."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{uri!r}: an S3 location needs a bucket, s3://bucket/prefix")
        return S3Store(parts.netloc, parts.path.lstrip("/"))
    if parts.scheme in {"", "file"}:
        return LocalStore(Path(parts.path if parts.scheme else uri).expanduser())
    raise ValueError(f"unsupported location {uri!r}: use a folder or s3://bucket/prefix")


def sibling_uri(uri: str, name: str) -> str:
    """The location named `name` beside `uri`'s last folder: the feedback store's default
    beside a bundle destination (`/srv/bundles` -> `/srv/feedback`, `s3://b/x/bundles` ->
    `s3://b/x/feedback`)."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        parent = parts.path.strip("/").rpartition("/")[0]
        return f"s3://{parts.netloc}/{parent + '/' if parent else ''}{name}"
    path = Path(parts.path if parts.scheme == "file" else uri).expanduser()
    return str(path.resolve().parent / name)
