"""Pen-drawn digits: trajectories people drew with a stylus, as the pen moved.

UCI's "Pen-Based Recognition of Handwritten Digits" (data set 81; E. Alpaydin and F. Alimoglu,
CC BY 4.0) records each digit as the pen's (x, y) on a tablet every 100 ms, pen-up and
pen-down kept, in UNIPEN text:

    .SEGMENT DIGIT 0 ? "8"        one per digit: its id and label
    .COMMENT 8 12 224             label, writer, the writer's sample number
    .PEN_DOWN                     a stroke: one `x y` line per point
     267  333
    .PEN_UP
    .DT 100                       time between strokes

This module parses that text (a malformed line is named with its number and what was
expected there), holds the digits as a table with stable row keys and the writer of each,
and splits the writers into those training may use and those kept for the drawn test set.
The tablet's y axis points up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from mlpaint.data.dataset import row_hashes
from mlpaint.data.fetch import (
    FetchContext,
    FetchedObject,
    SourcesExhaustedError,
    fetch_object,
)
from mlpaint.data.formats import DataFormatError
from mlpaint.data.integrity import IntegrityError
from mlpaint.data.pins import N_CLASSES, PEN_TRAJECTORIES_NAME
from mlpaint.data.transports import FetchError, TransientFetchError
from mlpaint.storage.manifest import MANIFEST, is_whole, load_arrays, save_arrays

logger = logging.getLogger(__name__)

#: UCI's own download: a zip of the whole data set, whose training portion is the member
#: below (Unix `compress`). Only that member is ever read: the writer-independent test
#: portion beside it is kept out of mlpaint on purpose.
UCI_PEN_ARCHIVE = ("https://archive.ics.uci.edu/static/public/81/"
                   "pen+based+recognition+of+handwritten+digits.zip#pendigits-orig.tra.Z")
_PACKAGED_COPY = ("files", f"{PEN_TRAJECTORIES_NAME}.gz")
PEN_TABLE_FORMAT_VERSION = 2


def packaged_pen_copy() -> Path:
    """The copy of UCI's training portion shipped inside the package (with its attribution,
    `mlpaint/data/files/PENDIGITS.md`), so a machine without internet still has it."""
    return Path(str(resources.files("mlpaint.data").joinpath(*_PACKAGED_COPY)))


def default_pen_sources() -> list[str]:
    """Tried in order: UCI's download, then the packaged copy."""
    return [UCI_PEN_ARCHIVE, str(packaged_pen_copy())]


@dataclass(frozen=True)
class PenDigit:
    """One drawn digit: its label, writer and the writer's sample number, and its strokes,
    each an (n, 2) array of integer tablet (x, y) points, y pointing up."""

    label: int
    writer: int
    sample: int
    strokes: tuple[np.ndarray, ...]


class UnipenFormatError(DataFormatError):
    """A line of a UNIPEN file that is not what the format allows there."""

    def __init__(self, name: str, line_number: int, expected: str, found: str) -> None:
        super().__init__(name, f"line {line_number}: expected {expected}, found "
                               f"{found.strip()[:80]!r}")
        self.line_number = line_number


_SEGMENT = re.compile(r'^\.SEGMENT\s+DIGIT\s+\S+\s+\S+\s+"(\d)"\s*$')
_COMMENT = re.compile(r"^\.COMMENT\s+(\d)\s+(\d+)\s+(\d+)\s*$")
_POINT = re.compile(r"^\s*(-?\d+)\s+(-?\d+)\s*$")
_DT = re.compile(r"^\.DT\s+\d+\s*$")


def parse_unipen(lines: Iterable[str], name: str) -> list[PenDigit]:
    """The digits of a UNIPEN text in the pendigits layout. Header keywords (`.INCLUDE`,
    `.LEXICON`, `.HIERARCHY` …) may come before the first `.SEGMENT`; then every digit is a
    `.SEGMENT DIGIT id ? "label"` line, a `.COMMENT label writer sample` line and one or more
    `.PEN_DOWN` … `.PEN_UP` blocks of `x y` lines, with `.DT` lines between blocks."""
    digits: list[PenDigit] = []
    label: int | None = None
    comment: tuple[int, int] | None = None
    strokes: list[np.ndarray] = []
    points: list[tuple[int, int]] | None = None  # the open stroke's, between PEN_DOWN and UP
    segment_line = 0

    def finish(number: int, found: str) -> None:
        if label is None:
            return
        if comment is None:
            raise UnipenFormatError(name, number, "a .COMMENT line (label writer sample) "
                                                  f"for the digit begun on line {segment_line}",
                                    found)
        if not strokes:
            raise UnipenFormatError(name, number, "a .PEN_DOWN block for the digit begun on "
                                                  f"line {segment_line}", found)
        digits.append(PenDigit(label, comment[0], comment[1], tuple(strokes)))

    number = 0
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if points is not None:  # inside a stroke: points until .PEN_UP
            if stripped == ".PEN_UP":
                if not points:
                    raise UnipenFormatError(name, number, "at least one `x y` point before "
                                                          ".PEN_UP", line)
                strokes.append(np.array(points, dtype=np.int16))
                points = None
            elif match := _POINT.match(stripped):
                points.append((int(match[1]), int(match[2])))
            else:
                raise UnipenFormatError(name, number, "an `x y` point of integers or .PEN_UP",
                                        line)
            continue
        if stripped.startswith(".SEGMENT"):
            finish(number, line)
            match = _SEGMENT.match(stripped)
            if not match:
                raise UnipenFormatError(name, number, '.SEGMENT DIGIT <id> ? "<digit 0-9>"',
                                        line)
            label, comment, strokes, segment_line = int(match[1]), None, [], number
        elif stripped.startswith(".COMMENT") and label is not None:
            match = _COMMENT.match(stripped)
            if not match or comment is not None or strokes:
                raise UnipenFormatError(name, number, "one .COMMENT <label> <writer> <sample> "
                                                      "right after .SEGMENT", line)
            if int(match[1]) != label:
                raise UnipenFormatError(name, number, f"the .SEGMENT's label {label} in its "
                                                      ".COMMENT", line)
            comment = (int(match[2]), int(match[3]))
        elif stripped == ".PEN_DOWN":
            if label is None:
                raise UnipenFormatError(name, number, ".SEGMENT before the first .PEN_DOWN",
                                        line)
            if comment is None:
                raise UnipenFormatError(name, number, ".COMMENT <label> <writer> <sample> "
                                                      "before .PEN_DOWN", line)
            points = []
        elif _DT.match(stripped) and label is not None:
            continue
        elif label is None and stripped.startswith("."):
            continue  # the header's keywords
        else:
            raise UnipenFormatError(name, number, ".SEGMENT, .COMMENT, .PEN_DOWN or .DT",
                                    line)
    if points is not None:
        raise UnipenFormatError(name, number + 1, ".PEN_UP closing the last stroke",
                                "end of file")
    finish(number + 1, "end of file")
    if not digits:
        raise UnipenFormatError(name, number + 1, "at least one .SEGMENT DIGIT", "end of file")
    return digits


def writer_key(writer: int) -> str:
    return f"pendigits/writer-{writer:03d}"


def row_key(writer: int, sample: int) -> str:
    """Stable across parses and machines: the writer and the writer's sample number."""
    return f"pen-w{writer:03d}-s{sample:04d}"


def drawn_test_writers(writers: Iterable[int], share: float) -> frozenset[int]:
    """The writers kept out of training for the drawn test set: the `share` of them (at
    least one) whose writer key hashes lowest, so the same writers are chosen on every
    machine and the choice does not depend on the order digits come in."""
    unique = sorted(set(writers))
    hashes = row_hashes([writer_key(w) for w in unique]).tolist()
    unique = [w for _, w in sorted(zip(hashes, unique, strict=True))]
    if not unique or share <= 0:
        return frozenset()
    return frozenset(unique[:max(1, round(share * len(unique)))])


@dataclass(frozen=True)
class PenTableMeta:
    rows: int
    writers: int
    origin: str
    sha256: str
    verified: bool
    format_version: int = PEN_TABLE_FORMAT_VERSION


@dataclass(frozen=True)
class PenTable:
    """Drawn digits as flat arrays: every point (`points`, (P, 2) int16), where each stroke
    ends in it (`stroke_ends`), where each digit's strokes end (`digit_ends`), and per digit
    its label, writer and sample number. Row keys are `row_key`'s; `row_hash` is the hash of
    each digit's *writer*, so a rule on it (MLDB's `rowHash() % 5`) keeps every writer's
    digits on one side of a fold."""

    points: np.ndarray
    stroke_ends: np.ndarray
    digit_ends: np.ndarray
    labels: np.ndarray
    writers: np.ndarray
    samples: np.ndarray
    meta: PenTableMeta

    @classmethod
    def from_digits(cls, digits: list[PenDigit], *, origin: str, sha256: str,
                    verified: bool) -> PenTable:
        strokes = [stroke for digit in digits for stroke in digit.strokes]
        table = cls(
            points=np.concatenate(strokes).astype(np.int16),
            stroke_ends=np.cumsum([len(s) for s in strokes]).astype(np.int64),
            digit_ends=np.cumsum([len(d.strokes) for d in digits]).astype(np.int64),
            labels=np.array([d.label for d in digits], dtype=np.uint8),
            writers=np.array([d.writer for d in digits], dtype=np.int32),
            samples=np.array([d.sample for d in digits], dtype=np.int32),
            meta=PenTableMeta(rows=len(digits), writers=len({d.writer for d in digits}),
                              origin=origin, sha256=sha256, verified=verified))
        table.check()
        return table

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def row_keys(self) -> list[str]:
        return [row_key(w, s) for w, s in zip(self.writers.tolist(), self.samples.tolist(),
                                              strict=True)]

    @property
    def row_hash(self) -> np.ndarray:
        return row_hashes([writer_key(w) for w in self.writers.tolist()])

    def rows_of(self, writers: Iterable[int]) -> np.ndarray:
        """The positions of the given writers' digits, in table order."""
        return np.flatnonzero(np.isin(self.writers, sorted(set(writers))))

    def strokes(self, row: int) -> list[np.ndarray]:
        """Digit `row`'s strokes, each an (n, 2) array of tablet (x, y), y up."""
        first = int(self.digit_ends[row - 1]) if row else 0
        ends = self.stroke_ends[first:int(self.digit_ends[row])]
        start = int(self.stroke_ends[first - 1]) if first else 0
        out = []
        for end in ends.tolist():
            out.append(self.points[start:end])
            start = end
        return out

    def label_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=N_CLASSES).tolist()

    def head(self, rows: int) -> PenTable:
        """The table of its first `rows` digits (a quick run's share)."""
        strokes = int(self.digit_ends[rows - 1])
        points = int(self.stroke_ends[strokes - 1])
        meta = PenTableMeta(rows=rows, writers=len(np.unique(self.writers[:rows])),
                            origin=self.meta.origin, sha256=self.meta.sha256,
                            verified=self.meta.verified)
        return PenTable(self.points[:points], self.stroke_ends[:strokes],
                        self.digit_ends[:rows], self.labels[:rows], self.writers[:rows],
                        self.samples[:rows], meta)

    def check(self) -> None:
        """What every user of the table relies on: labels in range, one row per (writer,
        sample), ends that index the points and strokes they claim."""
        name = self.meta.origin
        if not (len(self.labels) == len(self.writers) == len(self.samples)
                == len(self.digit_ends) == self.meta.rows):
            raise DataFormatError(name, "per-digit arrays disagree on the row count")
        if len(self.labels) and int(self.labels.max()) >= N_CLASSES:
            raise DataFormatError(name, f"a label outside 0..{N_CLASSES - 1}")
        if (np.diff(self.stroke_ends, prepend=0) <= 0).any():
            raise DataFormatError(name, "a stroke without points")
        if (np.diff(self.digit_ends, prepend=0) <= 0).any():
            raise DataFormatError(name, "a digit without strokes")
        if len(self.stroke_ends) and int(self.stroke_ends[-1]) != len(self.points):
            raise DataFormatError(name, "strokes do not end where the points do")
        if len(self.digit_ends) and int(self.digit_ends[-1]) != len(self.stroke_ends):
            raise DataFormatError(name, "digits do not end where the strokes do")
        pairs = self.writers.astype(np.int64) << 32 | self.samples.astype(np.int64)
        unique, counts = np.unique(pairs, return_counts=True)
        if (counts > 1).any():
            first = int(unique[counts > 1][0])
            raise DataFormatError(name, f"writer {first >> 32} has sample "
                                        f"{first & 0xFFFFFFFF} more than once")


_ARRAYS = ("points", "stroke_ends", "digit_ends", "labels", "writers", "samples")


def save_pen_table(table: PenTable, folder: Path) -> Path:
    """Write the table to `folder` atomically, its manifest last (`save_arrays`)."""
    return save_arrays(folder, {name: getattr(table, name) for name in _ARRAYS},
                       asdict(table.meta))


def load_pen_table(folder: Path) -> PenTable:
    """A saved pen table, its files checked against its manifest (once per process)."""
    meta_path = folder / "meta.json"
    if not is_whole(folder):
        raise FileNotFoundError(f"{folder}: not a saved pen table (no {MANIFEST})")
    arrays = load_arrays(folder, _ARRAYS)
    table = PenTable(**arrays, meta=PenTableMeta(**json.loads(meta_path.read_text())))
    table.check()
    return table


def pen_table_cache_key(sha256: str) -> str:
    material = json.dumps({"pen": sha256, "format": PEN_TABLE_FORMAT_VERSION})
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def read_pen_file(path: Path, *, origin: str, sha256: str, verified: bool) -> PenTable:
    """Parse a fetched (decompressed) UNIPEN file into a checked table."""
    with path.open(encoding="ascii", errors="strict") as text:
        try:
            digits = parse_unipen(text, origin)
        except UnicodeDecodeError as exc:
            raise DataFormatError(origin, f"not UNIPEN text: {exc}") from exc
    return PenTable.from_digits(digits, origin=origin, sha256=sha256, verified=verified)


class PenSourcesExhaustedError(SourcesExhaustedError):
    """No source in the chain yielded the pen trajectories."""


def fetch_pen_trajectories(sources: Sequence[str] | None, context: FetchContext
                           ) -> tuple[FetchedObject, str]:
    """The first source of the chain (`default_pen_sources()` when none are given) that
    yields the trajectories intact, and its URI. A file named as UCI's training portion is
    verified against its pinned hash; any other is read with an UNVERIFIED DATA warning.
    The error after a chain of failures says whether any was passing (`transient`), as the
    MNIST chain's does, so the task retries only then."""
    failures = []
    any_transient = False
    for uri in sources or default_pen_sources():
        try:
            return fetch_object(uri, context), uri
        except (FetchError, IntegrityError, DataFormatError) as exc:
            failures.append(f"{uri}: {exc}")
            any_transient |= isinstance(exc, TransientFetchError)
            logger.warning("pen source %s failed (%s); trying the next one", uri, exc)
    raise PenSourcesExhaustedError("no source yielded the pen trajectories: "
                                   + " | ".join(failures), transient=any_transient)
