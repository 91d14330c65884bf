"""Data checks of a feedback store: what training on it relies on, checked on every record.

The feedback store is the one data set that grows while the product runs, written by every
server process and read by every training run. Its records are checked here as data, not as
code: each record parses; its object is named after its id; its id still hashes its label
and drawing (a record edited in place, or copied under the wrong name, fails this); its
drawing still gives its pixels through the app's own preprocessing (if that function
changed, old records would train on digits the server no longer makes); something is drawn;
the same digit is not stored under two labels (training would get both answers); and each
rejection names a record. `mlpaint feedback check` prints the result; errors make it fail.
"""

from __future__ import annotations

import enum
import io
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from mlpaint.data.pins import IMAGE_SIDE, N_CLASSES
from mlpaint.feedback.store import (
    RECORDS,
    FeedbackError,
    FeedbackRecord,
    FeedbackStore,
    record_id,
)
from mlpaint.images.preprocess import image_to_mnist, something_drawn

#: Grey levels a re-made digit may differ by per pixel and still be the same preprocessing:
#: Pillow versions may round a resampled level differently, while a real change of the
#: preprocessing (another box, centre or scale) moves pixels by far more.
PIXEL_TOLERANCE = 2
#: Records named per finding kind in a report; the count is always whole.
EXAMPLES = 5


class Severity(enum.StrEnum):
    ERROR = "error"  # training on the store would learn something wrong
    WARNING = "warning"  # worth a reviewer's look, harmless to training


class Check(enum.StrEnum):
    UNREADABLE = "unreadable"
    MISNAMED = "misnamed"
    ID_MISMATCH = "id-mismatch"
    PREPROCESSING_DRIFT = "preprocessing-drift"
    UNDECODABLE_DRAWING = "undecodable-drawing"
    NOTHING_DRAWN = "nothing-drawn"
    CONFLICTING_LABELS = "conflicting-labels"
    DUPLICATE_DIGIT = "duplicate-digit"
    DANGLING_REJECTION = "dangling-rejection"

    @property
    def severity(self) -> Severity:
        return (Severity.WARNING if self in (Check.DUPLICATE_DIGIT, Check.DANGLING_REJECTION)
                else Severity.ERROR)


@dataclass(frozen=True)
class Finding:
    check: Check
    record_id: str  # for a rejection, the id it names
    detail: str


@dataclass(frozen=True)
class FeedbackCheckReport:
    store: str
    records: int
    rejected: int
    label_counts: list[int]
    corrected: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.check.severity is Severity.ERROR]

    @property
    def passed(self) -> bool:
        return not self.errors

    def by_check(self) -> dict[Check, list[Finding]]:
        grouped: dict[Check, list[Finding]] = defaultdict(list)
        for finding in self.findings:
            grouped[finding.check].append(finding)
        return dict(grouped)

    def to_json(self) -> dict:
        return {"store": self.store, "records": self.records, "rejected": self.rejected,
                "label_counts": self.label_counts, "corrected": self.corrected,
                "passed": self.passed,
                "findings": [{"check": f.check.value, "severity": f.check.severity.value,
                              "id": f.record_id, "detail": f.detail} for f in self.findings]}

    def lines(self) -> list[str]:
        """The report as a person reads it: totals, then each kind of finding with a few of
        its records."""
        out = [f"{self.store}: {self.records} records ({self.rejected} rejected, "
               f"{self.corrected} corrections); per digit {self.label_counts}"]
        for check, found in sorted(self.by_check().items()):
            out.append(f"{check.severity.value} {check.value}: {len(found)} record(s)")
            out += [f"  {f.record_id}  {f.detail}" for f in found[:EXAMPLES]]
            if len(found) > EXAMPLES:
                out.append(f"  ... and {len(found) - EXAMPLES} more (--json lists all)")
        out.append("passed" if self.passed else f"failed: {len(self.errors)} error(s)")
        return out


def _redrawn_pixels(record: FeedbackRecord) -> np.ndarray | None:
    """The record's drawing through today's preprocessing; None if it does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(record.drawing)) as image:
            image.load()
            return image_to_mnist(image).reshape(-1)
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _record_findings(key: str, record: FeedbackRecord) -> list[Finding]:
    found = []
    name = key.rsplit("/", 1)[-1].removesuffix(".json")
    if name != record.id:
        found.append(Finding(Check.MISNAMED, record.id, f"stored as {key}"))
    content = record.drawing if record.drawing is not None else record.pixels.tobytes()
    if (hashed := record_id(record.label, content)) != record.id:
        found.append(Finding(Check.ID_MISMATCH, record.id,
                             f"label {record.label} and its drawing hash to {hashed}: "
                             "changed since stored"))
    if not something_drawn(record.pixels.reshape(IMAGE_SIDE, IMAGE_SIDE) / 255.0):
        found.append(Finding(Check.NOTHING_DRAWN, record.id, "its pixels hold no digit"))
    if record.drawing is not None:
        redrawn = _redrawn_pixels(record)
        if redrawn is None:
            found.append(Finding(Check.UNDECODABLE_DRAWING, record.id,
                                 f"its {record.drawing_media_type} drawing does not decode"))
        else:
            moved = np.abs(redrawn.astype(np.int16) - record.pixels.astype(np.int16))
            if moved.max() > PIXEL_TOLERANCE:
                found.append(Finding(
                    Check.PREPROCESSING_DRIFT, record.id,
                    f"its drawing preprocesses to other pixels today: {int((moved > 0).sum())}"
                    f" differ, by up to {int(moved.max())} grey levels"))
    return found


def check_feedback_store(store: FeedbackStore) -> FeedbackCheckReport:
    """Every check on every record of `store`, read once."""
    findings: list[Finding] = []
    labels: Counter[int] = Counter()
    ids: set[str] = set()
    by_pixels: dict[bytes, list[FeedbackRecord]] = defaultdict(list)
    corrected = 0
    for key, data in store.raw_objects(RECORDS):
        try:
            record = FeedbackRecord.from_bytes(data, where=store.store.describe(key))
        except FeedbackError as exc:
            findings.append(Finding(Check.UNREADABLE, key, str(exc)))
            continue
        ids.add(record.id)
        labels[record.label] += 1
        corrected += record.corrected
        by_pixels[record.pixels.tobytes()].append(record)
        findings += _record_findings(key, record)
    for same in by_pixels.values():
        if len(same) < 2:
            continue
        # The first received stands; each later one is the finding, as it is the one
        # that changed what training would learn.
        first, *others = sorted(same, key=lambda r: (r.received_at, r.id))
        for other in others:
            if other.label != first.label:
                findings.append(Finding(Check.CONFLICTING_LABELS, other.id,
                                        f"the same digit as {first.id}, labelled {other.label}"
                                        f" there {first.label}"))
            else:
                findings.append(Finding(Check.DUPLICATE_DIGIT, other.id,
                                        f"the same digit as {first.id}, from another drawing"))
    rejections = store.rejections()
    findings += [Finding(Check.DANGLING_REJECTION, rejected, "a rejection of no stored record")
                 for rejected in sorted(rejections) if rejected not in ids]
    return FeedbackCheckReport(store.describe(), records=sum(labels.values()),
                               rejected=len(rejections.keys() & ids),
                               label_counts=[labels[d] for d in range(N_CLASSES)],
                               corrected=corrected, findings=findings)
