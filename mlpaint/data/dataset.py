"""The feature-label join: one table per split, checked, with stable row keys and row hashes.

A table lives on disk as a folder of `.npy` arrays plus `meta.json`, so tasks pass its path,
training memory-maps the pixels, and nobody re-parses 47 MB of IDX to read a label.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlpaint.data.fetch import SplitFiles
from mlpaint.data.formats import DataFormatError, read_csv_split, read_idx
from mlpaint.data.pins import IMAGE_SIDE, N_CLASSES, N_FEATURES, Split
from mlpaint.storage.manifest import MANIFEST, is_whole, save_arrays, verify_folder_once

PIXEL_COLUMNS: tuple[str, ...] = tuple(f"pixel_{i}" for i in range(N_FEATURES))
LABEL_COLUMN = "label"
ROW_KEY_COLUMN = "row_key"
TABLE_FORMAT_VERSION = 2


def row_keys(split: Split, count: int) -> list[str]:
    """Stable row keys: the split and the row's position in the official file order."""
    return [f"{split.value}-{index:05d}" for index in range(count)]


def row_hashes(keys: list[str]) -> np.ndarray:
    """A deterministic 64-bit hash per row key, the analogue of MLDB's `rowHash()`: the same
    key hashes the same on every machine and Python version, so `row_hash % 5` folds are
    reproducible."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little")
         for k in keys),
        dtype=np.uint64, count=len(keys))


@dataclass(frozen=True)
class TableMeta:
    split: str
    rows: int
    features: int
    origin: str
    inputs_sha256: dict[str, str]
    verified: bool
    format_version: int = TABLE_FORMAT_VERSION


@dataclass(frozen=True)
class SplitTable:
    """One split: pixels (rows x 784, uint8), labels (uint8), row keys and row hashes."""

    split: Split
    pixels: np.ndarray
    labels: np.ndarray
    row_hash: np.ndarray
    meta: TableMeta

    @property
    def row_keys(self) -> list[str]:
        return row_keys(self.split, len(self.labels))

    def label_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=N_CLASSES).tolist()

    def images(self) -> np.ndarray:
        return self.pixels.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)

    def to_frame(self):
        """The joined table as pandas: `pixel_0`…`pixel_783`, `label`, indexed by `row_key`."""
        import pandas as pd

        frame = pd.DataFrame(self.pixels, columns=list(PIXEL_COLUMNS), copy=False)
        frame[LABEL_COLUMN] = self.labels
        frame.index = pd.Index(self.row_keys, name=ROW_KEY_COLUMN)
        return frame


def join_split(split: Split, images: np.ndarray, labels: np.ndarray, *, origin: str,
               inputs_sha256: dict[str, str], verified: bool,
               images_name: str = "images", labels_name: str = "labels") -> SplitTable:
    """Join a split's images with its labels, checking everything a model will rely on."""
    if images.dtype != np.uint8:
        raise DataFormatError(images_name, f"pixels must be uint8, found {images.dtype}")
    if labels.dtype != np.uint8:
        raise DataFormatError(labels_name, f"labels must be uint8, found {labels.dtype}")
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataFormatError(images_name, f"images must be N x {IMAGE_SIDE} x {IMAGE_SIDE}, "
                                           f"found {images.shape}")
    if labels.ndim != 1:
        raise DataFormatError(labels_name, f"labels must be one-dimensional, found "
                                           f"{labels.shape}")
    if len(images) != len(labels):
        raise DataFormatError(labels_name, f"count mismatch: {len(labels)} labels for "
                                           f"{len(images)} images in {images_name}")
    if len(labels) == 0:
        raise DataFormatError(labels_name, "no rows")
    out_of_range = np.flatnonzero(labels >= N_CLASSES)
    if out_of_range.size:
        first = int(out_of_range[0])
        raise DataFormatError(labels_name, f"label {int(labels[first])} at row {first} is "
                                           f"outside 0..{N_CLASSES - 1} "
                                           f"({out_of_range.size} such rows)")
    pixels = images.reshape(len(images), N_FEATURES)
    meta = TableMeta(split=split.value, rows=len(labels), features=N_FEATURES, origin=origin,
                     inputs_sha256=dict(inputs_sha256), verified=verified)
    return SplitTable(split, pixels, labels, row_hashes(row_keys(split, len(labels))), meta)


def save_table(table: SplitTable, folder: Path) -> Path:
    """Write the table to `folder` atomically (`atomic_folder`), its manifest last: tables
    are cached under a key of the files they were built from, and verified when read."""
    return save_arrays(folder, {"pixels": table.pixels, "labels": table.labels,
                                "row_hash": table.row_hash}, asdict(table.meta))


def load_table(folder: Path, *, mmap: bool = True) -> SplitTable:
    """Load a saved table, its files checked against its manifest (once per process);
    pixels are memory-mapped unless `mmap=False`."""
    meta_path = folder / "meta.json"
    if not is_whole(folder):
        raise FileNotFoundError(f"{folder}: not a saved table (no {MANIFEST})")
    verify_folder_once(folder)
    meta = TableMeta(**json.loads(meta_path.read_text()))
    pixels = np.load(folder / "pixels.npy", mmap_mode="r" if mmap else None)
    labels = np.load(folder / "labels.npy")
    row_hash = np.load(folder / "row_hash.npy")
    if not (len(pixels) == len(labels) == len(row_hash) == meta.rows):
        raise DataFormatError(folder, "arrays disagree with meta.json on the row count")
    return SplitTable(Split(meta.split), pixels, labels, row_hash, meta)


def table_from_files(files: SplitFiles) -> SplitTable:
    """Parse a split's fetched files (IDX pair or CSV) and join them."""
    if files.csv is not None:
        images, labels = read_csv_split(files.csv)
        images_name = labels_name = files.origin
    elif files.images is not None and files.labels is not None:
        images = read_idx(files.images, expected_ndim=3)
        labels = read_idx(files.labels, expected_ndim=1)
        names = list(files.sha256)
        images_name, labels_name = (f"{files.origin} {name}" for name in names)
    else:
        raise ValueError(f"{files.split}: fetched files name neither a CSV nor an IDX pair")
    return join_split(files.split, images, labels, origin=files.origin,
                      inputs_sha256=files.sha256, verified=files.verified,
                      images_name=images_name, labels_name=labels_name)


def table_cache_key(files: SplitFiles) -> str:
    """Tables are cached by what they were built from: the input hashes and the format."""
    material = json.dumps({"split": files.split.value, "inputs": sorted(files.sha256.values()),
                           "format": TABLE_FORMAT_VERSION})
    return hashlib.sha256(material.encode()).hexdigest()[:32]
