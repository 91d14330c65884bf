"""Feature stages, shared by training and serving so the two cannot drift.

A stage maps uint8 images (N x 784, or N x 28 x 28) to the float32 matrix the model sees.
`raw` is the pixels as they are. `deskew` straightens each digit with image moments: the
shear that makes the ink's covariance axis-aligned, with the centre of mass moved to the
centre of the frame (the classic trick that takes a plain GBDT on MNIST from about 98.3% to
98.7% on the official test set).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum

import numpy as np
from numba import njit

from mlpaint.data.catalog import IMAGE_SIDE, N_FEATURES

# Part of the key of every stored feature matrix (and of the augmented and feedback rows,
# which go through a stage too): a matrix computed by older stage code is not read back as
# if this code had made it. Bump it when any stage's output changes, even slightly.
# 2: deskew compiled with numba, its sums in float64 (values moved by up to 0.002 of 255).
FEATURE_CODE_VERSION = "2"


class FeatureStage(StrEnum):
    RAW = "raw"
    DESKEW = "deskew"


def as_images(pixels: np.ndarray) -> np.ndarray:
    """N x 784 or N x 28 x 28 pixels as N x 28 x 28 (a view); anything else is refused."""
    array = np.asarray(pixels)
    if array.ndim == 2 and array.shape[1] == N_FEATURES:
        return array.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    if array.ndim == 3 and array.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE):
        return array
    raise ValueError(f"expected N x {N_FEATURES} or N x {IMAGE_SIDE} x {IMAGE_SIDE} pixels, "
                     f"got {array.shape}")


def raw_features(pixels: np.ndarray) -> np.ndarray:
    return as_images(pixels).reshape(-1, N_FEATURES).astype(np.float32)


@njit(cache=True, nogil=True)
def _deskew_into(images: np.ndarray, out: np.ndarray) -> None:
    """Compiled, one image after another: for the one digit of a request, numpy's
    vectorised form spent 0.4 ms in the overhead of its 30-odd array calls, about a fifth of
    a whole prediction; this takes 12 us, and the 60,000 training images 0.4 s instead of
    6 s. Sums are accumulated in float64."""
    middle = IMAGE_SIDE / 2.0
    for i in range(images.shape[0]):
        image = images[i]
        mass = 0.0
        sum_y = 0.0
        sum_x = 0.0
        for r in range(IMAGE_SIDE):
            for c in range(IMAGE_SIDE):
                v = float(image[r, c])
                mass += v
                sum_y += r * v
                sum_x += c * v
        if mass <= 0:  # blank: nothing to straighten
            centre_y = centre_x = middle
            alpha = 0.0
        else:
            centre_y = sum_y / mass
            centre_x = sum_x / mass
            var_y = 0.0
            cov_xy = 0.0
            for r in range(IMAGE_SIDE):
                dy = r - centre_y
                for c in range(IMAGE_SIDE):
                    v = float(image[r, c])
                    var_y += dy * dy * v
                    cov_xy += dy * (c - centre_x) * v
            var_y /= mass
            alpha = cov_xy / mass / var_y if var_y > 1e-6 else 0.0
        # Output pixel (r, c) samples the input bilinearly at
        # (r + cy - m, c + alpha (r - m) + cx - m): the shear about the centre of mass, which
        # also lands it in the middle of the frame. Outside the frame counts as blank.
        for r in range(IMAGE_SIDE):
            src_r = r + centre_y - middle
            r0 = int(np.floor(src_r))
            wr = src_r - r0
            for c in range(IMAGE_SIDE):
                src_c = c + alpha * (r - middle) + centre_x - middle
                c0 = int(np.floor(src_c))
                wc = src_c - c0
                value = 0.0
                for dr in range(2):
                    rr = r0 + dr
                    if rr < 0 or rr >= IMAGE_SIDE:
                        continue
                    weight_r = wr if dr else 1.0 - wr
                    for dc in range(2):
                        cc = c0 + dc
                        if 0 <= cc < IMAGE_SIDE:
                            value += weight_r * (wc if dc else 1.0 - wc) * float(image[rr, cc])
                out[i, r * IMAGE_SIDE + c] = value


# The fewest rows a thread is given: below twice this, one thread does the work (a drawing
# being served is one row).
_ROWS_PER_THREAD = 8192


def deskew_features(pixels: np.ndarray) -> np.ndarray:
    """Each row is deskewed on its own, so a large matrix is split across the cores in
    contiguous blocks: the compiled loop releases the interpreter. The values are the same
    whatever the split."""
    images = np.ascontiguousarray(as_images(pixels))
    out = np.empty((images.shape[0], N_FEATURES), dtype=np.float32)
    threads = min(os.cpu_count() or 1, images.shape[0] // _ROWS_PER_THREAD)
    if threads <= 1:
        _deskew_into(images, out)
        return out
    bounds = np.linspace(0, images.shape[0], threads + 1, dtype=np.int64)
    with ThreadPoolExecutor(threads, thread_name_prefix="deskew") as pool:
        list(pool.map(lambda start, stop: _deskew_into(images[start:stop], out[start:stop]),
                      bounds[:-1], bounds[1:]))
    return out


_STAGES: dict[FeatureStage, Callable[[np.ndarray], np.ndarray]] = {
    FeatureStage.RAW: raw_features,
    FeatureStage.DESKEW: deskew_features,
}


def apply_feature_stage(stage: FeatureStage | str, pixels: np.ndarray) -> np.ndarray:
    """The one entry point training and serving both call."""
    return _STAGES[FeatureStage(stage)](pixels)
