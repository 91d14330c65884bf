"""Object stores: a local folder or an S3 prefix, behind one small interface.

Every location mlpaint writes outside MLflow (published bundles, the feedback store) is a URI
naming a folder or `s3://bucket/prefix`. Both kinds go through the same calls, so code that
works on a laptop's folder works unchanged on S3, MinIO or moto (`AWS_ENDPOINT_URL`).

Guarantees both kinds keep:
- `put_bytes`/`put_file` replace an object whole: a reader sees the old or the new bytes;
- `create` writes an object only if its key is free, atomically, and never overwrites: of
  two concurrent creators of one key exactly one wins, which is what makes a
  content-addressed store safe to append to from many processes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from mlpaint.data.integrity import atomic_path, scratch_path


class ObjectStore(Protocol):
    def describe(self, key: str = "") -> str: ...

    def get_bytes(self, key: str) -> bytes | None: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, local: Path) -> None: ...

    def create(self, key: str, data: bytes) -> bool: ...

    def list_keys(self, prefix: str) -> list[str]: ...

    def list_folders(self, prefix: str) -> list[str]: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def check_writable(self) -> None: ...


class StoreUnavailableError(OSError):
    """A store that cannot be reached or written: the message says which and why."""


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

    def create(self, key: str, data: bytes) -> bool:
        destination = self.root / key
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
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                return None
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, local: Path) -> None:
        self._client().upload_file(str(local), self.bucket, self._key(key))

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                      IfNoneMatch="*")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            # 412: the key exists; 409: a concurrent conditional write to it is in flight.
            if code in {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}:
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
