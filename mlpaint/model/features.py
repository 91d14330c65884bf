"""Feature stages, shared by training and serving so the two cannot drift.

A stage maps uint8 images (N x 784, or N x 28 x 28) to the float32 matrix the model sees.
`raw` is the pixels as they are. `deskew` straightens each digit with image moments: the
shear that makes the ink's covariance axis-aligned, with the centre of mass moved to the
centre of the frame (the classic trick that takes a plain GBDT on MNIST from about 98.3% to
98.7% on the official test set). `moments` deskews and also scales each digit to one size by
the spread of its ink, keeping part of its proportions (moment normalisation with
aspect-ratio adaptation). Without augmentation it adds to the default model, over `deskew`,
about 0.4 points on MLDB's held-out rows and 0.3 on the official test set (BENCHMARKS.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from mlpaint.data.pins import IMAGE_SIDE, N_FEATURES, as_images
from mlpaint.model.feature_stages import FeatureStage


def raw_features(pixels: np.ndarray) -> np.ndarray:
    return as_images(pixels).reshape(-1, N_FEATURES).astype(np.float32)


@njit(cache=True, nogil=True)
def _ink_moments(image: np.ndarray) -> tuple[float, float, float, float, float]:
    """(centre row, centre column, shear, height spread, width spread) of a digit's ink.

    The shear `alpha` makes the ink's covariance axis-aligned (column moves by alpha per row
    from the centre); the spreads are the ink's variances along the rows and, after that
    shear, along the columns. A blank image gets the frame's middle and no shear."""
    middle = IMAGE_SIDE / 2.0
    mass = 0.0
    sum_y = 0.0
    sum_x = 0.0
    for r in range(IMAGE_SIDE):
        for c in range(IMAGE_SIDE):
            v = float(image[r, c])
            mass += v
            sum_y += r * v
            sum_x += c * v
    if mass <= 0:
        return middle, middle, 0.0, 0.0, 0.0
    centre_y = sum_y / mass
    centre_x = sum_x / mass
    var_y = 0.0
    var_x = 0.0
    cov_xy = 0.0
    for r in range(IMAGE_SIDE):
        dy = r - centre_y
        for c in range(IMAGE_SIDE):
            v = float(image[r, c])
            dx = c - centre_x
            var_y += dy * dy * v
            var_x += dx * dx * v
            cov_xy += dy * dx * v
    var_y /= mass
    var_x /= mass
    cov_xy /= mass
    alpha = cov_xy / var_y if var_y > 1e-6 else 0.0
    return centre_y, centre_x, alpha, var_y, var_x - alpha * cov_xy


@njit(cache=True, nogil=True)
def _resample_into(image: np.ndarray, out: np.ndarray, centre_y: float, centre_x: float,
                   alpha: float, scale_y: float, scale_x: float) -> None:
    """Output pixel (r, c) samples the input bilinearly at row centre_y + dy and column
    centre_x + alpha dy + (c - m) / scale_x, with dy = (r - m) / scale_y and m the frame's
    middle: the shear about the centre of mass and a scale per axis, landing the centre of
    mass in the middle of the frame. Outside the frame counts as blank."""
    middle = IMAGE_SIDE / 2.0
    for r in range(IMAGE_SIDE):
        dy = (r - middle) / scale_y
        src_r = centre_y + dy
        r0 = int(np.floor(src_r))
        wr = src_r - r0
        for c in range(IMAGE_SIDE):
            src_c = centre_x + alpha * dy + (c - middle) / scale_x
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
            out[r * IMAGE_SIDE + c] = value


@njit(cache=True, nogil=True)
def _deskew_into(images: np.ndarray, out: np.ndarray) -> None:
    """Compiled, one image after another: for the one digit of a request, numpy's
    vectorised form spends most of its time in the overhead of its 30-odd array calls, a
    sizeable part of a whole prediction, and on the training images it is many times slower
    too. Sums are accumulated in float64."""
    for i in range(images.shape[0]):
        centre_y, centre_x, alpha, _, _ = _ink_moments(images[i])
        _resample_into(images[i], out[i], centre_y, centre_x, alpha, 1.0, 1.0)


# The `moments` stage's size: the longer side's extent (four standard deviations of ink) is
# scaled to this many pixels. 22 is the median height of MNIST's training digits measured
# so; on MLDB's held-out rows, 20 to 26 scored alike (within 0.08 points) and 16 and 18 lower
# (BENCHMARKS.md).
MOMENT_EXTENT = 22.0
# A spread below this many pixels (a dot, a perfectly straight hairline) is taken as this,
# so the scale stays finite: at most MOMENT_EXTENT / 2 for the longer side.
_MIN_EXTENT = 2.0


@njit(cache=True, nogil=True)
def _moments_into(images: np.ndarray, out: np.ndarray) -> None:
    """Moment normalisation with aspect-ratio adaptation (Liu, Nakashima, Sako and
    Fujisawa, "Handwritten digit recognition: benchmarking of state-of-the-art techniques",
    2003): deskew as above, then scale each axis so that the longer extent becomes
    MOMENT_EXTENT and the shorter one keeps an aspect ratio of sqrt(sin(pi/2 r)), r the
    digit's own. Thin digits (a 1) are widened and wide ones made taller, less than all the
    way, so every digit's ink covers a similar area whatever its size and proportions."""
    for i in range(images.shape[0]):
        centre_y, centre_x, alpha, spread_y, spread_x = _ink_moments(images[i])
        height = max(4.0 * np.sqrt(max(spread_y, 0.0)), _MIN_EXTENT)
        width = max(4.0 * np.sqrt(max(spread_x, 0.0)), _MIN_EXTENT)
        longer = max(height, width)
        shorter_extent = MOMENT_EXTENT * np.sqrt(np.sin(np.pi / 2.0 * min(height, width)
                                                        / longer))
        if height >= width:
            scale_y, scale_x = MOMENT_EXTENT / height, shorter_extent / width
        else:
            scale_y, scale_x = shorter_extent / height, MOMENT_EXTENT / width
        _resample_into(images[i], out[i], centre_y, centre_x, alpha, scale_y, scale_x)


# The fewest rows a thread is given: below twice this, one thread does the work (a drawing
# being served is one row).
_ROWS_PER_THREAD = 8192


def _row_by_row(kernel: Callable[[np.ndarray, np.ndarray], None],
                pixels: np.ndarray) -> np.ndarray:
    """Each row is transformed on its own, so a large matrix is split across the cores in
    contiguous blocks: the compiled loop releases the interpreter. The values are the same
    whatever the split."""
    images = np.ascontiguousarray(as_images(pixels))
    out = np.empty((images.shape[0], N_FEATURES), dtype=np.float32)
    threads = min(os.cpu_count() or 1, images.shape[0] // _ROWS_PER_THREAD)
    if threads <= 1:
        kernel(images, out)
        return out
    bounds = np.linspace(0, images.shape[0], threads + 1, dtype=np.int64)
    with ThreadPoolExecutor(threads, thread_name_prefix="features") as pool:
        list(pool.map(lambda start, stop: kernel(images[start:stop], out[start:stop]),
                      bounds[:-1], bounds[1:]))
    return out


#: What `drawing_measures` returns per digit, in its columns' order: the ink (in pixels of
#: full ink), the ink's height and width (four standard deviations, in pixels, the width
#: measured across the slant) and the slant (degrees, positive leaning right).
DRAWING_MEASURES = ("ink", "height_px", "width_px", "slant_deg")


@njit(cache=True, nogil=True)
def _measures_into(images: np.ndarray, out: np.ndarray) -> None:
    for i in range(images.shape[0]):
        _, _, alpha, spread_y, spread_x = _ink_moments(images[i])
        out[i, 0] = images[i].astype(np.float64).sum() / 255.0
        out[i, 1] = 4.0 * np.sqrt(max(spread_y, 0.0))
        out[i, 2] = 4.0 * np.sqrt(max(spread_x, 0.0))
        # Rows grow downwards: a digit leaning right has its top to the right, alpha < 0.
        out[i, 3] = -np.degrees(np.arctan(alpha))


def drawing_measures(pixels: np.ndarray) -> np.ndarray:
    """(rows, 4) float64 measures of each digit's ink (DRAWING_MEASURES), from the same
    moments the feature stages normalise away: how people's drawings differ from the
    training digits in amount, size and slant shows here before it shows in accuracy."""
    images = np.ascontiguousarray(as_images(pixels))
    out = np.empty((images.shape[0], len(DRAWING_MEASURES)), dtype=np.float64)
    _measures_into(images, out)
    return out


def deskew_features(pixels: np.ndarray) -> np.ndarray:
    return _row_by_row(_deskew_into, pixels)


def moments_features(pixels: np.ndarray) -> np.ndarray:
    return _row_by_row(_moments_into, pixels)


_STAGES: dict[FeatureStage, Callable[[np.ndarray], np.ndarray]] = {
    FeatureStage.RAW: raw_features,
    FeatureStage.DESKEW: deskew_features,
    FeatureStage.MOMENTS: moments_features,
}


def apply_feature_stage(stage: FeatureStage | str, pixels: np.ndarray) -> np.ndarray:
    """The one entry point training and serving both call."""
    return _STAGES[FeatureStage(stage)](pixels)
