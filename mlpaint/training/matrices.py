"""References to the matrices a training run reads, kept on disk in the cache: small,
picklable values that tasks hand each other instead of the arrays themselves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlpaint.augment import fold_training_rows


def _load_matrix(folder: Path, row_info: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (memory-mapped), labels, and a per-row array (`row_info`) from a folder."""
    return (np.load(folder / "features.npy", mmap_mode="r"), np.load(folder / "labels.npy"),
            np.load(folder / row_info))


@dataclass(frozen=True)
class FeatureMatrix:
    """A reference to features on disk: `features.npy` (float32), `labels.npy`,
    `row_hash.npy`."""

    folder: str
    rows: int
    stage: str

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _load_matrix(Path(self.folder), "row_hash.npy")


@dataclass(frozen=True)
class AugmentedMatrix:
    """A reference to augmented copies of a split's rows on disk: `features.npy` (float32,
    after the feature stage), `labels.npy`, and `source_row.npy`, the position of the row
    each copy was made from (so a fold takes only copies of its own training rows)."""

    folder: str
    rows: int

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _load_matrix(Path(self.folder), "source_row.npy")


@dataclass(frozen=True)
class FeedbackMatrix:
    """A reference to a feedback snapshot through the feature stage, on disk:
    `train_features.npy`/`train_labels.npy` (the records outside the wild set, then their
    augmented copies) and `wild_features.npy`/`wild_labels.npy` (the wild test set, never
    trained on), plus `ids.json` naming the records of each part."""

    folder: str
    store: str
    digest: str
    train_records: int
    train_rows: int  # records plus augmented copies
    wild_rows: int
    rejected: int
    weight: float

    def load_train(self) -> tuple[np.ndarray, np.ndarray]:
        folder = Path(self.folder)
        return np.load(folder / "train_features.npy"), np.load(folder / "train_labels.npy")

    def load_wild(self) -> tuple[np.ndarray, np.ndarray]:
        folder = Path(self.folder)
        return np.load(folder / "wild_features.npy"), np.load(folder / "wild_labels.npy")

    @property
    def sample_grid(self) -> str:
        return str(Path(self.folder) / "sample-grid-feedback.png")

    def to_json(self) -> dict:
        return {"store": self.store, "digest": self.digest,
                "train_records": self.train_records, "train_rows": self.train_rows,
                "wild_rows": self.wild_rows, "rejected": self.rejected, "weight": self.weight}


def with_augmented(train: tuple[np.ndarray, np.ndarray], train_rows: np.ndarray | None,
                   augmented: AugmentedMatrix | None) -> tuple[np.ndarray, np.ndarray]:
    """The training rows plus the augmented copies made from them (all copies when
    `train_rows` is None: the final model trains on every row)."""
    if augmented is None:
        return train
    features, labels, source = augmented.load()
    chosen = (np.arange(len(source)) if train_rows is None
              else fold_training_rows(train_rows, source))
    return (np.concatenate([train[0], np.asarray(features[chosen])]),
            np.concatenate([train[1], labels[chosen]]))
