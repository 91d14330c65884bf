"""Exploration: the summary MLDB's notebook printed, label counts, and a sample-digit grid."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlpaint.data.catalog import N_CLASSES
from mlpaint.data.dataset import SplitTable


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


def render_label_grid(images: np.ndarray, labels: np.ndarray, destination: Path, *,
                      title: str, per_label: int = 10, seed: int = 0) -> Path:
    """A PNG with one row per digit and up to `per_label` sampled images (N x 28 x 28) of
    it; a digit with fewer examples leaves its row short."""
    import matplotlib

    matplotlib.use("Agg")  # headless; called at run time, never at import
    import matplotlib.pyplot as plt

    chosen = sample_indices(labels, per_label, seed)
    # One image drawn once: a hundred separate axes took matplotlib 1.5 s per grid.
    mosaic = sample_mosaic(images, chosen, per_label)
    cell = (mosaic.shape[0] + 2) / N_CLASSES
    figure, axis = plt.subplots(figsize=(per_label * 0.8, N_CLASSES * 0.8))
    axis.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([digit * cell + images.shape[1] / 2 - 0.5 for digit in range(N_CLASSES)],
                    labels=[str(digit) for digit in range(N_CLASSES)], fontsize=12)
    axis.tick_params(length=0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    axis.set_title(f"{title}: {per_label} samples per digit (seed {seed})")
    figure.tight_layout()
    destination.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(destination, dpi=80)
    plt.close(figure)
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
