"""Readers for the three MNIST formats: IDX (raw), the pickled archive, and CSV.

Each reader returns uint8 arrays and raises `DataFormatError` naming the file and what is
wrong. Decompression happens before these readers, at fetch time.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mlpaint.data.pins import IMAGE_SIDE, N_FEATURES, Split

IDX_UBYTE = 0x08
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


class DataFormatError(ValueError):
    """A file is not what it claims to be: bad magic, wrong size, bad values."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def read_idx(path: Path, *, expected_ndim: int) -> np.ndarray:
    """Read an uncompressed IDX file of unsigned bytes, checking header and exact size."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        header = handle.read(4)
        if len(header) < 4:
            raise DataFormatError(path, f"truncated: {size} bytes, too short for an IDX header")
        zero, dtype_code, ndim = struct.unpack(">HBB", header)
        magic = int.from_bytes(header, "big")
        if zero != 0 or dtype_code != IDX_UBYTE or ndim != expected_ndim:
            wanted = IDX_IMAGES_MAGIC if expected_ndim == 3 else IDX_LABELS_MAGIC
            raise DataFormatError(path, f"wrong magic number 0x{magic:08x}, expected "
                                        f"0x{wanted:08x}")
        dims_bytes = handle.read(4 * ndim)
        if len(dims_bytes) < 4 * ndim:
            raise DataFormatError(path, "truncated inside the IDX header")
        dims = struct.unpack(f">{ndim}I", dims_bytes)
        expected = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))
        if size != expected:
            kind = "truncated" if size < expected else "trailing bytes"
            raise DataFormatError(path, f"{kind}: header {dims} needs {expected} bytes, "
                                        f"file has {size}")
        data = np.fromfile(handle, dtype=np.uint8)
    return data.reshape(dims)


def idx_header(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8:
        raise TypeError("IDX writer takes uint8 arrays")
    return struct.pack(">HBB", 0, IDX_UBYTE, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)


def write_idx(array: np.ndarray, destination: BinaryIO) -> None:
    destination.write(idx_header(array))
    destination.write(np.ascontiguousarray(array).tobytes())


# --- the pickled archive -------------------------------------------------------------------

def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 protocol-2 pickles call to rebuild bytes; only the latin-1 codec is
    admitted, so no other codec can be reached through it."""
    if encoding.replace("-", "").replace("_", "").lower() not in {"latin1", "iso88591"}:
        raise UnsafePickleError(f"refusing codec {encoding!r} in _codecs.encode")
    return text.encode("latin1")


_ALLOWED_GLOBALS: Mapping[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # The archive was written by Python 2's numpy; numpy 2 moved the module to numpy._core.
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    # Protocol 5 pickles of numpy arrays rebuild them from a raw buffer.
    ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something other than plain numpy arrays."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and dtypes; any other global (os.system, builtins.eval, …) is
    refused before it is looked up, so nothing named in the pickle ever runs."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: only numpy arrays are allowed") from None


def load_pickle_archive(stream: BinaryIO, path: Path | str) -> dict[Split, tuple[np.ndarray,
                                                                                  np.ndarray]]:
    """Read the (train, valid, test) archive into uint8 images and labels per split.

    Train and valid, in that order, are the official training set; pixels are byte / 256.
    """
    try:
        archive = _ArraysOnlyUnpickler(stream, encoding="latin1").load()
    except UnsafePickleError as exc:
        raise DataFormatError(path, str(exc)) from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataFormatError(path, f"not a readable pickle: {exc}") from exc
    if not (isinstance(archive, tuple) and len(archive) == 3):
        raise DataFormatError(path, "expected a (train, valid, test) tuple")
    parts = []
    for name, part in zip(("train", "valid", "test"), archive, strict=True):
        if not (isinstance(part, tuple) and len(part) == 2
                and all(isinstance(a, np.ndarray) for a in part)):
            raise DataFormatError(path, f"{name}: expected an (images, labels) array pair")
        images, labels = part
        if images.ndim != 2 or images.shape[1] != N_FEATURES or images.dtype.kind != "f":
            raise DataFormatError(path, f"{name}: images must be float (N, {N_FEATURES}), "
                                        f"got {images.dtype} {images.shape}")
        scaled = images.astype(np.float64) * 256.0
        as_bytes = np.rint(scaled)
        if not np.array_equal(as_bytes, scaled) or as_bytes.min() < 0 or as_bytes.max() > 255:
            raise DataFormatError(path, f"{name}: pixels are not byte/256 values")
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
            raise DataFormatError(path, f"{name}: labels must be N integers")
        if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
            raise DataFormatError(path, f"{name}: labels outside 0..255")
        parts.append((as_bytes.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE),
                      labels.astype(np.uint8)))
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = parts
    return {
        Split.TRAIN: (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
        Split.TEST: (test_x, test_y),
    }


# --- CSV -----------------------------------------------------------------------------------

def read_csv_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CSV with a label column and 784 pixel columns (MLDB's digits CSV and the common
    `mnist_train.csv` shape). With a header, the label column is the one named `label`;
    without one, the first column."""
    import pandas as pd

    with path.open("rb") as handle:
        first_line = handle.readline().decode("utf-8", errors="replace")
    cells = [c.strip().strip('"').lower() for c in first_line.split(",")]
    has_header = any(not c.replace(".", "", 1).lstrip("-").isdigit() for c in cells if c)
    try:
        frame = pd.read_csv(path, header=0 if has_header else None)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataFormatError(path, f"not a readable CSV: {exc}") from exc
    if has_header:
        lowered = {str(c).strip().lower(): c for c in frame.columns}
        if "label" not in lowered:
            raise DataFormatError(path, "header has no 'label' column")
        label_column = lowered["label"]
    else:
        label_column = frame.columns[0]
    pixels = frame.drop(columns=[label_column])
    if pixels.shape[1] != N_FEATURES:
        raise DataFormatError(path, f"{pixels.shape[1]} pixel columns, expected {N_FEATURES}")
    values = pixels.to_numpy()
    labels = frame[label_column].to_numpy()
    for what, array in (("pixel", values), ("label", labels)):
        if array.dtype.kind not in "iu":
            raise DataFormatError(path, f"{what} values must be integers, found {array.dtype}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise DataFormatError(path, "pixel values outside 0..255")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise DataFormatError(path, "label values outside 0..255")
    images = values.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    return images, labels.astype(np.uint8)

