"""The feedback store: drawings people labelled on the page, kept for training and review.

Layout under the store's root (a folder or `s3://bucket/prefix`, see mlpaint.storage.stores):

    records/<id>.json       one record: the label, the drawing as received (base64), its
                            28x28 preprocessing, what the app answered, when
    rejections/<id>.json    a reviewer's exclusion of a record, with the reason

The store is append-only and content-addressed. A record's id is the hash of its label and
the drawing's bytes, so the same drawing posted twice with the same label is one record, and
every record is one object created atomically only if its id is free: no reader sees half a
record, no writer replaces another's, and any number of server processes can append at once.
Rejecting a record adds an object beside it; nothing is ever overwritten or deleted.
Nothing personal is kept: no address, no cookie, no account.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mlpaint.data.pins import N_CLASSES, N_FEATURES
from mlpaint.storage.stores import ObjectStore, store_for

FEEDBACK_FORMAT_VERSION = 1
RECORDS = "records"
REJECTIONS = "rejections"
ID_HEX_DIGITS = 32  # 128 bits of SHA-256: collisions are not a practical concern
#: Reads in flight when reading a whole store: within botocore's pool of 10 connections.
READ_THREADS = 8
#: Reads done ahead of the one the reader waits for. Bounded: the reads outpace the parsing,
#: and with every read submitted at once the bytes of a whole store piled up unparsed (peak
#: memory 452 MB instead of 256 MB for 100,000 records).
READ_AHEAD = 4 * READ_THREADS
#: The record's pixels and label as a CSV the `*.csv` source reads (mlpaint.data.formats).
CSV_HEADER = ("label", *(f"pixel_{i}" for i in range(N_FEATURES)))


class FeedbackError(ValueError):
    """A record that cannot be stored or found as asked."""


def record_id(label: int, content: bytes) -> str:
    """The content address: the same drawing with the same label has the same id."""
    digest = hashlib.sha256(b"mlpaint-feedback\0%d\0" % label + content)
    return digest.hexdigest()[:ID_HEX_DIGITS]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class FeedbackRecord:
    id: str
    label: int
    pixels: np.ndarray  # (784,) uint8, the 28x28 preprocessing the model read
    drawing: bytes | None  # the image as received; None when the client sent pixels
    drawing_media_type: str | None
    answered_digit: int | None  # what the app said before the correction (None: not told)
    bundle_version: str | None
    model_version: str | None
    received_at: str

    @classmethod
    def new(cls, *, label: int, pixels: np.ndarray, drawing: bytes | None = None,
            drawing_media_type: str | None = None, answered_digit: int | None = None,
            bundle_version: str | None = None, model_version: str | None = None
            ) -> FeedbackRecord:
        if not 0 <= label < N_CLASSES:
            raise FeedbackError(f"label {label} is not a digit 0-9")
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.size != N_FEATURES:
            raise FeedbackError(f"pixels must be {N_FEATURES} uint8 values")
        content = drawing if drawing is not None else pixels.tobytes()
        return cls(id=record_id(label, content), label=label, pixels=pixels.reshape(N_FEATURES),
                   drawing=drawing, drawing_media_type=drawing_media_type,
                   answered_digit=answered_digit, bundle_version=bundle_version,
                   model_version=model_version, received_at=_now())

    @property
    def corrected(self) -> bool:
        """Whether the person said the app's answer was wrong."""
        return self.answered_digit is not None and self.answered_digit != self.label

    def to_bytes(self) -> bytes:
        return json.dumps({
            "format_version": FEEDBACK_FORMAT_VERSION, "id": self.id, "label": self.label,
            "answered_digit": self.answered_digit, "bundle_version": self.bundle_version,
            "model_version": self.model_version, "received_at": self.received_at,
            "pixels": self.pixels.tolist(), "drawing_media_type": self.drawing_media_type,
            "drawing": base64.b64encode(self.drawing).decode() if self.drawing else None,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str) -> FeedbackRecord:
        try:
            doc = json.loads(data)
            if doc.get("format_version") != FEEDBACK_FORMAT_VERSION:
                raise FeedbackError(f"{where}: feedback format {doc.get('format_version')!r}, "
                                    f"this mlpaint reads {FEEDBACK_FORMAT_VERSION}")
            pixels = np.asarray(doc["pixels"], dtype=np.int64)
            if pixels.shape != (N_FEATURES,) or pixels.min() < 0 or pixels.max() > 255:
                raise FeedbackError(f"{where}: pixels are not {N_FEATURES} values in 0..255")
            label = int(doc["label"])
            if not 0 <= label < N_CLASSES:
                raise FeedbackError(f"{where}: label {label} is not a digit 0-9")
            drawing = base64.b64decode(doc["drawing"]) if doc["drawing"] else None
            return cls(id=doc["id"], label=label, pixels=pixels.astype(np.uint8),
                       drawing=drawing, drawing_media_type=doc["drawing_media_type"],
                       answered_digit=doc["answered_digit"],
                       bundle_version=doc["bundle_version"],
                       model_version=doc["model_version"], received_at=doc["received_at"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FeedbackError):
                raise
            raise FeedbackError(f"{where}: not a feedback record ({exc})") from exc

    def summary(self) -> dict:
        """The record without its arrays, for listings and `--json`."""
        return {"id": self.id, "label": self.label, "answered_digit": self.answered_digit,
                "corrected": self.corrected, "bundle_version": self.bundle_version,
                "model_version": self.model_version, "received_at": self.received_at,
                "drawing": self.drawing_media_type}


@dataclass(frozen=True)
class Rejection:
    id: str
    reason: str
    rejected_at: str


class FeedbackStore:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @classmethod
    def at(cls, uri: str) -> FeedbackStore:
        return cls(store_for(uri))

    def describe(self) -> str:
        return self.store.describe()

    def add(self, record: FeedbackRecord) -> bool:
        """Store a record; False if this drawing with this label is already stored (the first
        record of it is kept, as it was)."""
        return self.store.create(f"{RECORDS}/{record.id}.json", record.to_bytes())

    def ids(self) -> list[str]:
        return [Path(key).stem for key in self.store.list_keys(RECORDS)
                if key.endswith(".json")]

    def resolve(self, id_or_prefix: str) -> str:
        """The full id a unique prefix (at least 6 hex digits) names."""
        wanted = id_or_prefix.strip().lower()
        if len(wanted) < 6:
            raise FeedbackError(f"{id_or_prefix!r}: give at least 6 characters of an id")
        matches = [i for i in self.ids() if i.startswith(wanted)]
        if len(matches) != 1:
            raise FeedbackError(f"{id_or_prefix!r}: " + (
                "no such record" if not matches else f"{len(matches)} records match"))
        return matches[0]

    def get(self, id_or_prefix: str) -> FeedbackRecord:
        record_id_ = self.resolve(id_or_prefix)
        key = f"{RECORDS}/{record_id_}.json"
        data = self.store.get_bytes(key)
        if data is None:
            raise FeedbackError(f"{id_or_prefix!r}: no such record")
        return FeedbackRecord.from_bytes(data, where=self.store.describe(key))

    def raw_objects(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        """Every JSON object under `prefix` with its key, in key order. Read a few at a time:
        from S3 each read is a round trip, and one after another they add up (100,000
        records)."""
        keys = [key for key in self.store.list_keys(prefix) if key.endswith(".json")]
        with ThreadPoolExecutor(READ_THREADS) as pool:
            reads: deque[Future[bytes | None]] = deque()
            for index, key in enumerate(keys):
                while len(reads) < READ_AHEAD and index + len(reads) < len(keys):
                    reads.append(pool.submit(self.store.get_bytes, keys[index + len(reads)]))
                data = reads.popleft().result()
                if data is not None:  # removed since it was listed
                    yield key, data

    def records(self) -> Iterator[FeedbackRecord]:
        """Every record, in id order (ids are hashes: the order is stable, not temporal)."""
        for key, data in self.raw_objects(RECORDS):
            yield FeedbackRecord.from_bytes(data, where=self.store.describe(key))

    def reject(self, id_or_prefix: str, reason: str) -> tuple[str, bool]:
        """Exclude a record from training; (its id, False if it was already rejected)."""
        full = self.resolve(id_or_prefix)
        body = json.dumps({"id": full, "reason": reason, "rejected_at": _now()}).encode()
        return full, self.store.create(f"{REJECTIONS}/{full}.json", body)

    def rejections(self) -> dict[str, Rejection]:
        found = {}
        for _, data in self.raw_objects(REJECTIONS):
            doc = json.loads(data)
            found[doc["id"]] = Rejection(doc["id"], doc["reason"], doc["rejected_at"])
        return found

    def accepted(self, rejected: dict[str, Rejection] | None = None) -> list[FeedbackRecord]:
        """The records training may read: all but the rejected (`rejected`, or the store's
        rejections read now), by id."""
        rejected = self.rejections() if rejected is None else rejected
        return sorted((r for r in self.records() if r.id not in rejected), key=lambda r: r.id)


def write_csv(records: list[FeedbackRecord], path: Path) -> int:
    """The records as `label,pixel_0..pixel_783` rows, the layout the CSV source reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_HEADER)
        for record in records:
            writer.writerow([record.label, *record.pixels.tolist()])
    return len(records)


# --- feedback as training data ---------------------------------------------------------------

#: Row hashes fall in this many buckets; `wild_share` of them hold the wild test set.
WILD_BUCKETS = 100


def feedback_row_hashes(ids: list[str]) -> np.ndarray:
    """Stable 64-bit row hashes of records, from their ids (the row keys `feedback-<id>`),
    computed as MNIST's are: the same record hashes the same in every run."""
    from mlpaint.data.dataset import row_hashes

    return row_hashes([f"feedback-{record_id}" for record_id in ids])


def wild_rows(row_hash: np.ndarray, share: float) -> np.ndarray:
    """Which records form the wild test set: a fixed share chosen by row hash, so a record is
    in it (never trained on) or out of it in every run, whatever else the store holds."""
    cut = round(share * WILD_BUCKETS)
    return (row_hash % np.uint64(WILD_BUCKETS)) < np.uint64(cut)


@dataclass(frozen=True)
class FeedbackSnapshot:
    """The accepted records of a store at one moment, as arrays, ordered by id."""

    store: str
    ids: tuple[str, ...]
    pixels: np.ndarray  # (rows, 784) uint8
    labels: np.ndarray  # (rows,) uint8
    rejected: int

    @classmethod
    def of(cls, store: FeedbackStore) -> FeedbackSnapshot:
        rejected = store.rejections()
        records = store.accepted(rejected)
        pixels = (np.stack([r.pixels for r in records]) if records
                  else np.zeros((0, N_FEATURES), np.uint8))
        return cls(store.describe(), tuple(r.id for r in records), pixels,
                   np.array([r.label for r in records], dtype=np.uint8), len(rejected))

    @property
    def row_hash(self) -> np.ndarray:
        return feedback_row_hashes(list(self.ids))

    @property
    def digest(self) -> str:
        """What the snapshot holds, by content: its record ids (which hash the drawings and
        labels). Two snapshots with the same digest train the same."""
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()
