"""Exploration: the summary MLDB's notebook printed, label counts, and a sample-digit grid."""

from __future__ import annotations

from dataclasses import dataclass
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


def render_sample_grid(table: SplitTable, destination: Path, *, per_label: int = 10,
                       seed: int = 0) -> Path:
    """A PNG with one row per digit and `per_label` sampled images in each."""
    import matplotlib

    matplotlib.use("Agg")  # headless; called at run time, never at import
    import matplotlib.pyplot as plt

    images = table.images()
    chosen = sample_indices(table.labels, per_label, seed)
    figure, axes = plt.subplots(N_CLASSES, per_label, figsize=(per_label * 0.8, N_CLASSES * 0.8),
                                squeeze=False)
    for digit, rows in enumerate(chosen):
        for column in range(per_label):
            axis = axes[digit][column]
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
            if column < len(rows):
                axis.imshow(images[rows[column]], cmap="gray_r", vmin=0, vmax=255)
        axes[digit][0].set_ylabel(str(digit), rotation=0, labelpad=10, fontsize=12,
                                  va="center")
    figure.suptitle(f"{table.split.value}: {per_label} samples per digit (seed {seed})")
    figure.tight_layout()
    destination.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(destination, dpi=80)
    plt.close(figure)
    return destination
