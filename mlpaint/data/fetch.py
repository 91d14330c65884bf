"""Sources, the mirror chain, and verified fetching into the content-addressed cache.

A source URI names a folder of the four IDX files, a pickled archive (`*.pkl.gz`), or a CSV
(`*.csv[.gz]`, one split, named by `train` / `test` / `t10k` in its file name). Sources are
tried in order; each split is taken from the first source that yields it intact.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mlpaint.data.formats import DataFormatError, load_pickle_archive, write_idx
from mlpaint.data.integrity import (
    BlobCache,
    IntegrityError,
    Pins,
    parse_sha256_pins,
    scratch_path,
    sha256_file,
)
from mlpaint.data.pins import (
    DEFAULT_MIRRORS,
    MNIST_IDX_FILES,
    PICKLE_ARCHIVE_SHA256,
    IdxFile,
    Part,
    Split,
)
from mlpaint.data.transports import (
    FetchError,
    NotFoundError,
    ProgressCallback,
    RetryPolicy,
    TransientFetchError,
    download_to_path,
    join_uri,
    transport_for,
)

logger = logging.getLogger(__name__)

ProgressFactory = Callable[[str], ProgressCallback]
"""Given a description of what is being downloaded, return a progress callback for it."""

_CHUNK = 1 << 20


def _no_progress(_: str) -> ProgressCallback:
    return lambda done, total: None


@dataclass(frozen=True)
class SplitFiles:
    """Where one split's verified files lie in the cache, and where they came from."""

    split: Split
    origin: str
    verified: bool
    sha256: dict[str, str]  # name -> hash of the cached (decompressed) blob
    images: Path | None = None  # IDX images, when the source is IDX or a pickle
    labels: Path | None = None  # IDX labels
    csv: Path | None = None  # a CSV holding both


@dataclass(frozen=True)
class FetchContext:
    pins: Pins
    cache: BlobCache
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    progress: ProgressFactory = _no_progress


@dataclass(frozen=True)
class FetchedObject:
    path: Path  # in the cache, decompressed
    sha256: str
    verified: bool


_COMPRESSIONS = (".gz", ".Z")  # gzip, and Unix `compress` (LZW), as UCI's files are


def _compression(name: str) -> str | None:
    return next((suffix for suffix in _COMPRESSIONS if name.endswith(suffix)), None)


def _decompress(raw: Path, decompressed: Path, name: str, compression: str) -> str:
    """Write `raw`'s decompressed bytes to `decompressed`; return their sha256."""
    plain_hash = hashlib.sha256()
    if compression == ".Z":
        import ncompress

        try:
            plain = ncompress.decompress(raw.read_bytes())
        except (ValueError, OSError) as exc:
            raise DataFormatError(name, f"corrupt or truncated .Z (LZW) file: {exc}") from exc
        decompressed.write_bytes(plain)
        plain_hash.update(plain)
        return plain_hash.hexdigest()
    try:
        with gzip.open(raw, "rb") as source, decompressed.open("wb") as out:
            for chunk in iter(lambda: source.read(_CHUNK), b""):
                plain_hash.update(chunk)
                out.write(chunk)
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError
        raise DataFormatError(name, f"corrupt or truncated gzip: {exc}") from exc
    return plain_hash.hexdigest()


def _zip_member(uri: str) -> tuple[str, str | None]:
    """(the URI to download, the archive member to take) of `archive.zip#member`; a URI
    without such a fragment is downloaded as it is."""
    base, sep, member = uri.partition("#")
    if sep and member and PurePosixPath(urlsplit(base).path or base).suffix.lower() == ".zip":
        return base, member
    return uri, None


def _extract_member(archive: Path, member: str, destination: Path, uri: str) -> None:
    try:
        with zipfile.ZipFile(archive) as opened, opened.open(member) as source, \
                destination.open("wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
    except KeyError as exc:
        raise NotFoundError(f"{uri}: the archive has no member {member!r}") from exc
    except zipfile.BadZipFile as exc:
        raise DataFormatError(uri, f"not a readable zip archive: {exc}") from exc


def fetch_object(uri: str, context: FetchContext, *, decompressed_sha256: str | None = None
                 ) -> FetchedObject:
    """Fetch one object, verify it against its pins, and cache its decompressed bytes.

    `archive.zip#member` takes one member of a zip archive. Pins by name: `x.gz` (or `x.Z`)
    pins the bytes as fetched, `x` the decompressed bytes. When the decompressed hash is
    known in advance and cached, nothing is downloaded.
    """
    download_uri, member = _zip_member(uri)
    name = PurePosixPath(member or urlsplit(uri).path).name or uri
    compression = _compression(name)
    plain_name = name.removesuffix(compression) if compression else name
    pin_plain = decompressed_sha256 or context.pins.for_name(plain_name)
    pin_raw = context.pins.for_name(name) if compression else None
    if pin_plain and (cached := context.cache.lookup(pin_plain)):
        logger.info("%s: cached (sha256 %s…)", name, pin_plain[:12])
        return FetchedObject(cached, pin_plain, verified=True)

    scratch = context.cache.scratch_dir()
    with scratch_path(scratch, name) as raw, scratch_path(scratch, plain_name) as plain, \
            scratch_path(scratch, f"{name}.zip") as archive:
        if member is None:
            download_to_path(transport_for(download_uri), raw, context.progress(uri),
                             context.retry)
        else:
            download_to_path(transport_for(download_uri), archive, context.progress(uri),
                             context.retry)
            _extract_member(archive, member, raw, uri)
        raw_sha = sha256_file(raw)
        if compression:
            plain_sha = _decompress(raw, plain, uri, compression)
        else:
            shutil.copyfile(raw, plain)
            plain_sha = raw_sha
        if pin_raw and raw_sha != pin_raw:
            raise IntegrityError(f"{uri}: sha256 {raw_sha} does not match the pinned {pin_raw}")
        if pin_plain and plain_sha != pin_plain:
            raise IntegrityError(f"{uri}: decompressed sha256 {plain_sha} does not match "
                                 f"the pinned {pin_plain}")
        verified = bool(pin_raw or pin_plain)
        if not verified:
            logger.warning(
                "UNVERIFIED DATA: %s has no pinned hash; its bytes (sha256 %s) are used as "
                "they came. Pin it with --sha256 %s=%s to verify future fetches.",
                uri, plain_sha, plain_name, plain_sha)
        stored = context.cache.store(plain, plain_sha)
    return FetchedObject(stored, plain_sha, verified)


# --- source layouts ------------------------------------------------------------------------

class Source:
    """One entry of the chain. Subclasses say which splits they can yield and fetch them."""

    uri: str

    def splits(self) -> frozenset[Split]:
        raise NotImplementedError

    def fetch(self, wanted: frozenset[Split], context: FetchContext) -> dict[Split, SplitFiles]:
        raise NotImplementedError


@dataclass(frozen=True)
class IdxFolderSource(Source):
    uri: str

    def splits(self) -> frozenset[Split]:
        return frozenset(Split)

    def _fetch_idx(self, idx: IdxFile, context: FetchContext) -> FetchedObject:
        """Try `name.gz`, then the raw `name`."""
        try:
            return fetch_object(join_uri(self.uri, idx.name + ".gz"), context)
        except NotFoundError as gz_missing:
            try:
                return fetch_object(join_uri(self.uri, idx.name), context)
            except NotFoundError as raw_missing:
                raise NotFoundError(f"{gz_missing}; {raw_missing}") from raw_missing

    def fetch(self, wanted: frozenset[Split], context: FetchContext) -> dict[Split, SplitFiles]:
        fetched: dict[Split, SplitFiles] = {}
        for split in sorted(wanted):
            parts = {idx.part: (idx, self._fetch_idx(idx, context))
                     for idx in MNIST_IDX_FILES if idx.split == split}
            (images_idx, images), (labels_idx, labels) = parts[Part.IMAGES], parts[Part.LABELS]
            fetched[split] = SplitFiles(
                split, origin=self.uri, verified=images.verified and labels.verified,
                sha256={images_idx.name: images.sha256, labels_idx.name: labels.sha256},
                images=images.path, labels=labels.path)
        return fetched


@dataclass(frozen=True)
class PickleArchiveSource(Source):
    """MLDB's `mnist.pkl.gz`: converted once into the official IDX files, which are then
    checked against the IDX pins, proving the archive yields the published bytes."""

    uri: str

    def splits(self) -> frozenset[Split]:
        return frozenset(Split)

    def _canonical(self, context: FetchContext) -> bool:
        name = PurePosixPath(urlsplit(self.uri).path).name
        return context.pins.for_name(name) == PICKLE_ARCHIVE_SHA256

    def fetch(self, wanted: frozenset[Split], context: FetchContext) -> dict[Split, SplitFiles]:
        canonical = self._canonical(context)
        if canonical:  # the archive's content is known: its IDX output may be cached already
            cached = {idx: context.cache.lookup(idx.sha256) for idx in MNIST_IDX_FILES
                      if idx.split in wanted}
            if all(cached.values()):
                logger.info("%s: IDX files derived from it are cached", self.uri)
                return _split_files_from_idx(cached, origin=self.uri, verified=True)

        archive = fetch_object(self.uri, context)
        with archive.path.open("rb") as stream:
            arrays = load_pickle_archive(stream, self.uri)
        stored: dict[IdxFile, Path] = {}
        for idx in MNIST_IDX_FILES:
            if idx.split not in wanted:
                continue
            images, labels = arrays[idx.split]
            array = images if idx.part == Part.IMAGES else labels
            stored[idx] = _store_derived_idx(array, idx, context, check_pin=canonical)
        # The decompressed pickle (220 MB of float32) is of no further use once converted.
        archive.path.unlink(missing_ok=True)
        return _split_files_from_idx(stored, origin=self.uri,
                                     verified=archive.verified)


def _store_derived_idx(array, idx: IdxFile, context: FetchContext, *, check_pin: bool) -> Path:
    scratch = context.cache.scratch_dir()
    with scratch_path(scratch, idx.name) as tmp:
        with tmp.open("wb") as out:
            write_idx(array, out)
        actual = sha256_file(tmp)
        if check_pin and actual != idx.sha256:
            raise IntegrityError(f"{idx.name} derived from the pickled archive has sha256 "
                                 f"{actual}, not the published {idx.sha256}")
        return context.cache.store(tmp, actual)


def _split_files_from_idx(paths: dict[IdxFile, Path], *, origin: str, verified: bool
                          ) -> dict[Split, SplitFiles]:
    result: dict[Split, SplitFiles] = {}
    for split in sorted({idx.split for idx in paths}):
        by_part = {idx.part: (idx, path) for idx, path in paths.items() if idx.split == split}
        (images_idx, images), (labels_idx, labels) = by_part[Part.IMAGES], by_part[Part.LABELS]
        result[split] = SplitFiles(split, origin=origin, verified=verified,
                                   sha256={images_idx.name: images.name,
                                           labels_idx.name: labels.name},
                                   images=images, labels=labels)
    return result


@dataclass(frozen=True)
class CsvSource(Source):
    uri: str
    split: Split

    def splits(self) -> frozenset[Split]:
        return frozenset({self.split})

    def fetch(self, wanted: frozenset[Split], context: FetchContext) -> dict[Split, SplitFiles]:
        fetched = fetch_object(self.uri, context)
        name = PurePosixPath(urlsplit(self.uri).path).name.removesuffix(".gz")
        return {self.split: SplitFiles(self.split, origin=self.uri, verified=fetched.verified,
                                       sha256={name: fetched.sha256}, csv=fetched.path)}


_TEST_WORDS = re.compile(r"(test|t10k)", re.IGNORECASE)
_TRAIN_WORDS = re.compile(r"train", re.IGNORECASE)


def parse_source(uri: str) -> Source:
    """Infer the layout from the URI's last path component."""
    transport_for(uri)  # rejects an unsupported scheme now, not after other sources ran
    name = PurePosixPath(urlsplit(uri).path).name if "://" in uri else Path(uri).name
    lowered = name.lower()
    if lowered.endswith((".pkl.gz", ".pkl")):
        return PickleArchiveSource(uri)
    if lowered.endswith((".csv", ".csv.gz")):
        if _TEST_WORDS.search(name):
            return CsvSource(uri, Split.TEST)
        if _TRAIN_WORDS.search(name):
            return CsvSource(uri, Split.TRAIN)
        raise ValueError(f"{uri}: cannot tell the split of a CSV from its name; "
                         "put 'train' or 'test' in the file name")
    if re.search(r"-idx\d-ubyte(\.gz)?$", lowered):
        raise ValueError(f"{uri}: name the folder holding the four IDX files, not one file")
    return IdxFolderSource(uri)


class SourcesExhaustedError(FetchError):
    """No source in the chain yielded every split. `transient` is true when some source
    failed only for passing reasons (timeouts, 5xx, resets), so a later retry may succeed."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def fetch_dataset(sources: Sequence[str] | None, context: FetchContext
                  ) -> dict[Split, SplitFiles]:
    """Walk the chain (the default mirrors when `sources` is empty) until every split is
    fetched and verified. A hard failure of one source moves on to the next."""
    chain = [parse_source(uri) for uri in (sources or DEFAULT_MIRRORS)]
    needed = frozenset(Split)
    fetched: dict[Split, SplitFiles] = {}
    failures: list[str] = []
    any_transient = False
    for source in chain:
        wanted = source.splits() & needed
        if not wanted:
            continue
        try:
            got = source.fetch(wanted, context)
        except (FetchError, IntegrityError, DataFormatError) as exc:
            failures.append(f"{source.uri}: {exc}")
            any_transient |= isinstance(exc, TransientFetchError)
            logger.warning("source %s failed (%s); trying the next one", source.uri, exc)
            continue
        fetched.update(got)
        needed = needed - got.keys()
        if not needed:
            return fetched
    missing = ", ".join(sorted(s.value for s in needed))
    raise SourcesExhaustedError(f"no source yielded the {missing} split(s): "
                                + " | ".join(failures or ["no source provides them"]),
                                transient=any_transient)


def dataset_fingerprint(fetched: dict[Split, SplitFiles]) -> str:
    """One hash of every fetched file's content: the same data has the same fingerprint,
    whichever mirror it came from."""
    material = json.dumps({s.value: f.sha256 for s, f in sorted(fetched.items())},
                          sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()


class IngestSpec(BaseModel):
    """What an ingestion fetches and how it explores it: the ingest flow's one parameter (the
    Prefect run form's fields), validated here, once, naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[str] | None = Field(
        None, description="URIs tried in order: s3://bucket/prefix/, https://…/, a local "
                          "folder of the four IDX files, a *.pkl.gz archive, or *train*/"
                          "*test* CSV files (default: the mirror chain)")
    sha256: dict[str, str] = Field(
        default_factory=dict, description="pins for files without built-in hashes: "
                                          "{file name: hex digest}")
    samples_per_label: int = Field(10, ge=1, description="images per digit in the sample grid")
    seed: int = Field(0, description="picks the sample-grid images")

    @field_validator("sources")
    @classmethod
    def _sources_parse(cls, sources: list[str] | None) -> list[str] | None:
        for uri in sources or []:
            parse_source(uri)  # raises ValueError naming what is wrong with it
        return sources

    @field_validator("sha256")
    @classmethod
    def _pins_are_hashes(cls, pins: dict[str, str]) -> dict[str, str]:
        return parse_sha256_pins([f"{name}={digest}" for name, digest in pins.items()])
