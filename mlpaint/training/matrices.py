"""References to the matrices a training run reads: small, picklable values naming a
finished folder in the catalog's store by URI, which tasks hand each other instead of the
arrays themselves. Any process, a Dask worker on another machine included, loads one
through its own verified local copy (`mlpaint.storage.catalog.local_folder`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlpaint.images.augment import fold_training_rows
from mlpaint.storage.catalog import local_folder


def _load_matrix(uri: str, row_info: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (memory-mapped), labels, and a per-row array (`row_info`) from a folder."""
    folder = local_folder(uri)
    return (np.load(folder / "features.npy", mmap_mode="r"), np.load(folder / "labels.npy"),
            np.load(folder / f"{row_info}.npy"))


def _write_arrays(folder: Path, **arrays: np.ndarray) -> None:
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)


@dataclass(frozen=True)
class FeatureMatrix:
    """A reference to a split's features: `features.npy` (float32), `labels.npy`,
    `row_hash.npy`."""

    folder: str
    rows: int
    stage: str

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _load_matrix(self.folder, "row_hash")

    @staticmethod
    def write(folder: Path, *, features: np.ndarray, labels: np.ndarray,
              row_hash: np.ndarray) -> None:
        """Write the files `load` reads."""
        _write_arrays(folder, features=features, labels=labels, row_hash=row_hash)


@dataclass(frozen=True)
class AugmentedMatrix:
    """A reference to augmented copies of a split's rows: `features.npy` (float32,
    after the feature stage), `labels.npy`, and `source_row.npy`, the position of the row
    each copy was made from (so a fold takes only copies of its own training rows)."""

    folder: str
    rows: int

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _load_matrix(self.folder, "source_row")

    @staticmethod
    def write(folder: Path, *, features: np.ndarray, labels: np.ndarray,
              source_row: np.ndarray) -> None:
        """Write the files `load` reads."""
        _write_arrays(folder, features=features, labels=labels, source_row=source_row)


SAMPLE_GRID = "sample-grid-feedback.png"
RECORD_IDS = "ids.json"


@dataclass(frozen=True)
class FeedbackMatrix:
    """A reference to a feedback snapshot through the feature stage:
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
        folder = local_folder(self.folder)
        return np.load(folder / "train_features.npy"), np.load(folder / "train_labels.npy")

    def load_wild(self) -> tuple[np.ndarray, np.ndarray]:
        folder = local_folder(self.folder)
        return np.load(folder / "wild_features.npy"), np.load(folder / "wild_labels.npy")

    def sample_grid(self) -> Path:
        return local_folder(self.folder) / SAMPLE_GRID

    def record_ids(self) -> dict[str, list[str]]:
        """The record ids of each part, `train` and `wild`."""
        return json.loads((local_folder(self.folder) / RECORD_IDS).read_text())

    @staticmethod
    def write(folder: Path, *, train_features: np.ndarray, train_labels: np.ndarray,
              wild_features: np.ndarray, wild_labels: np.ndarray,
              record_ids: dict[str, list[str]]) -> None:
        """Write the files `load_train`, `load_wild` and `record_ids` read (the sample grid
        is drawn into `folder` by the caller, at `SAMPLE_GRID`)."""
        _write_arrays(folder, train_features=train_features, train_labels=train_labels,
                      wild_features=wild_features, wild_labels=wild_labels)
        (folder / RECORD_IDS).write_text(json.dumps(record_ids))

    def to_json(self) -> dict:
        return {"store": self.store, "digest": self.digest,
                "train_records": self.train_records, "train_rows": self.train_rows,
                "wild_rows": self.wild_rows, "rejected": self.rejected, "weight": self.weight}


PEN_SAMPLE_GRID = "sample-grid-pen.png"
PEN_WRITERS = "writers.json"


def pen_writers(uri: str) -> dict[str, list[int]]:
    """The writers of each part, `train` and `drawn`, of the pen matrix stored at `uri`."""
    return json.loads((local_folder(uri) / PEN_WRITERS).read_text())


@dataclass(frozen=True)
class PenMatrix:
    """A reference to pen drawings through the feature stage: `train_features.npy`,
    `train_labels.npy` and `train_row_hash.npy` (the training writers' renderings, then
    their augmented copies; every row's hash is its writer's, so a fold rule keeps each
    writer on one side) and `drawn_features.npy`, `drawn_labels.npy`, `drawn_writers.npy`
    (the drawn test set: the held-out writers' digits, which nothing trains on), plus
    `writers.json` naming the writers of each part."""

    folder: str
    sha256: str  # of the trajectories it was rendered from
    origin: str
    verified: bool
    train_rows: int  # renderings plus their augmented copies
    rendered_rows: int  # the first of the train rows: renderings, not augmented copies
    train_writers: int
    drawn_rows: int
    drawn_writers: int
    weight: float

    def load_train(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        folder = local_folder(self.folder)
        return (np.load(folder / "train_features.npy"), np.load(folder / "train_labels.npy"),
                np.load(folder / "train_row_hash.npy"))

    def load_drawn(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        folder = local_folder(self.folder)
        return (np.load(folder / "drawn_features.npy"), np.load(folder / "drawn_labels.npy"),
                np.load(folder / "drawn_writers.npy"))

    def sample_grid(self) -> Path:
        return local_folder(self.folder) / PEN_SAMPLE_GRID

    def writers(self) -> dict[str, list[int]]:
        """The writers of each part, `train` and `drawn`."""
        return pen_writers(self.folder)

    @staticmethod
    def write(folder: Path, *, train_features: np.ndarray, train_labels: np.ndarray,
              train_row_hash: np.ndarray, drawn_features: np.ndarray,
              drawn_labels: np.ndarray, drawn_writers: np.ndarray,
              writers: dict[str, list[int]]) -> None:
        """Write the files `load_train`, `load_drawn` and `writers` read (the sample grid
        is drawn into `folder` by the caller, at `PEN_SAMPLE_GRID`)."""
        _write_arrays(folder, train_features=train_features, train_labels=train_labels,
                      train_row_hash=train_row_hash, drawn_features=drawn_features,
                      drawn_labels=drawn_labels, drawn_writers=drawn_writers)
        (folder / PEN_WRITERS).write_text(json.dumps(writers))

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "origin": self.origin, "verified": self.verified,
                "train_rows": self.train_rows, "rendered_rows": self.rendered_rows,
                "train_writers": self.train_writers,
                "drawn_rows": self.drawn_rows, "drawn_writers": self.drawn_writers,
                "weight": self.weight}


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
