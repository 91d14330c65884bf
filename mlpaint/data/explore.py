"""Exploration: the summary MLDB's notebook printed, label counts, and a sample-digit grid."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlpaint.data.dataset import SplitTable
from mlpaint.data.pins import N_CLASSES


@dataclass(frozen=True)
class SplitSummary:
    rows: int
    features: int
    label_counts: list[int]  # digit 0..9
    verified: bool
    origin: str


def summarize(table: SplitTable) -> SplitSummary:
    return SplitSummary(rows=int(table.meta.rows), features=int(table.pixels.shape[1]),
                        label_counts=table.label_counts(), verified=table.meta.verified,
                        origin=table.meta.origin)


def sample_indices(labels: np.ndarray, per_label: int, seed: int) -> list[np.ndarray]:
    """For each digit, up to `per_label` row indices chosen at random (seeded)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for digit in range(N_CLASSES):
        rows = np.flatnonzero(labels == digit)
        take = min(per_label, rows.size)
        chosen.append(np.sort(rng.choice(rows, size=take, replace=False)) if take else rows)
    return chosen


def sample_mosaic(images: np.ndarray, chosen: list[np.ndarray], per_label: int,
                  gap: int = 2) -> np.ndarray:
    """One uint8 image: a row per digit of its chosen samples, `gap` blank pixels between."""
    side = images.shape[1]
    cell = side + gap
    mosaic = np.zeros((len(chosen) * cell - gap, per_label * cell - gap), dtype=np.uint8)
    for digit, rows in enumerate(chosen):
        for column, row in enumerate(rows[:per_label]):
            mosaic[digit * cell: digit * cell + side,
                   column * cell: column * cell + side] = images[row]
    return mosaic


def render_sample_grid(table: SplitTable, destination: Path, *, per_label: int = 10,
                       seed: int = 0) -> Path:
    """A PNG with one row per digit and `per_label` sampled images in each."""
    return render_label_grid(table.images(), table.labels, destination,
                             title=table.split.value, per_label=per_label, seed=seed)


# The grid's drawing: each digit's pixels scaled up this many times, a band for the title
# on top and one for the digit labels on the left.
_GRID_SCALE = 2
_GRID_TITLE_BAND = 28
_GRID_LABEL_BAND = 24
_GRID_FONT_SIZE = 14


def render_label_grid(images: np.ndarray, labels: np.ndarray, destination: Path, *,
                      title: str, per_label: int = 10, seed: int = 0) -> Path:
    """A PNG with one row per digit and up to `per_label` sampled images (N x 28 x 28) of
    it, dark ink on white; a digit with fewer examples leaves its row short.

    Drawn with Pillow, not matplotlib: it is on the training flow's way to its first fit,
    where matplotlib's import and figures cost more than the grids themselves."""
    from PIL import Image, ImageDraw, ImageFont

    chosen = sample_indices(labels, per_label, seed)
    mosaic = sample_mosaic(images, chosen, per_label)
    ink = Image.fromarray(255 - mosaic, mode="L").resize(
        (mosaic.shape[1] * _GRID_SCALE, mosaic.shape[0] * _GRID_SCALE), Image.NEAREST)
    canvas = Image.new("L", (ink.width + _GRID_LABEL_BAND, ink.height + _GRID_TITLE_BAND),
                       255)
    canvas.paste(ink, (_GRID_LABEL_BAND, _GRID_TITLE_BAND))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=_GRID_FONT_SIZE)
    draw.text((canvas.width // 2, _GRID_TITLE_BAND // 2),
              f"{title}: {per_label} samples per digit (seed {seed})", fill=0, font=font,
              anchor="mm")
    row_height = (mosaic.shape[0] + 2) / N_CLASSES * _GRID_SCALE  # the mosaic's gap is 2
    side = images.shape[1] * _GRID_SCALE
    for digit in range(N_CLASSES):
        draw.text((_GRID_LABEL_BAND // 2, _GRID_TITLE_BAND + digit * row_height + side / 2),
                  str(digit), fill=0, font=font, anchor="mm")
    destination.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(destination)
    return destination


@dataclass(frozen=True)
class DatasetReport:
    """What ingestion made: the joined tables (folders), per-split summaries and sample
    grids, and the fingerprint of the data they came from."""

    fingerprint: str
    tables: dict[str, str]
    summaries: dict[str, SplitSummary]
    sample_grids: dict[str, str]
    report_dir: str

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "splits": {split: asdict(summary) for split, summary in self.summaries.items()},
            "tables": self.tables,
            "sample_grids": self.sample_grids,
        }
