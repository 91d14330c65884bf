"""From a drawing to an MNIST digit: the one preprocessing function serving and tests share.

MNIST's recipe (LeCun et al.): the digit's bounding box is scaled so its longer side is 20
pixels, keeping the aspect ratio, with anti-aliasing that leaves grey levels at the edges; the
20-pixel box is placed in a 28x28 field so that its centre of mass sits at the centre. MLPaint
binarised the canvas and stretched it to fill the frame; this keeps MNIST's geometry and grey
levels, which is what the model was trained on.
"""

from __future__ import annotations

import numpy as np

from mlpaint.data.pins import IMAGE_SIDE

DIGIT_BOX = 20  # the longer side of the digit's box, in pixels, as in MNIST
MASS_CENTRE = IMAGE_SIDE // 2
INK_THRESHOLD = 0.05  # of the darkest ink: fainter pixels do not extend the bounding box


# "Nothing drawn": ink fainter than this (of full black) is not a stroke, and ink whose
# bounding box spans less than this share of the drawing's longer side is a dot or a speck,
# not a digit. On the page's 280-pixel canvas that is 34 px: a tap of the 18 px pen stays
# below it, the smallest digit people draw there is well above it; on a 28x28 input it is
# 3.4 px, where MNIST's narrowest digits, its 1s, are 20 px tall.
MIN_INK_LEVEL = 0.2
MIN_EXTENT_FRACTION = 0.12


def something_drawn(ink: np.ndarray) -> bool:
    """Whether a 2-D ink map (values in [0, 1], ink high) holds something that could be a
    digit, rather than nothing, a dot or a faint smudge."""
    ink = np.asarray(ink, dtype=np.float32)
    peak = float(ink.max()) if ink.size else 0.0
    if not np.isfinite(peak) or peak < MIN_INK_LEVEL:
        return False
    inked = ink >= max(INK_THRESHOLD * peak, MIN_INK_LEVEL / 2)
    rows, cols = np.flatnonzero(inked.any(axis=1)), np.flatnonzero(inked.any(axis=0))
    extent = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    return extent >= MIN_EXTENT_FRACTION * max(ink.shape)


def ink_from_image(image) -> np.ndarray:
    """Ink intensity in [0, 1] from a PIL image: dark strokes on a light or transparent
    background count as ink; transparency counts as background."""
    # Luminance is Pillow's own conversion to "L" (ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B),
    # done in its C code on bytes: a float32 RGBA array for a 280x280 canvas took four times
    # as long, a millisecond of every feedback post (bench/feedback.py).
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        lightness = np.asarray(rgba.convert("L"), dtype=np.float32)
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32)
        return (255.0 - lightness) * alpha * np.float32(1 / (255 * 255))
    return (255.0 - np.asarray(image.convert("L"), dtype=np.float32)) * np.float32(1 / 255)


def to_mnist(ink: np.ndarray) -> np.ndarray:
    """A 2-D ink map of any size (values >= 0, ink high) to a 28x28 uint8 MNIST-like digit.
    A blank drawing gives a blank digit."""
    from PIL import Image

    ink = np.asarray(ink, dtype=np.float32)
    if ink.ndim != 2 or ink.size == 0:
        raise ValueError(f"expected a 2-D image, got shape {ink.shape}")
    peak = float(ink.max())
    if not np.isfinite(peak) or peak <= 0:
        return np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    rows = np.flatnonzero((ink >= INK_THRESHOLD * peak).any(axis=1))
    cols = np.flatnonzero((ink >= INK_THRESHOLD * peak).any(axis=0))
    cropped = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] / peak
    height, width = cropped.shape
    scale = DIGIT_BOX / max(height, width)
    new_h = max(1, round(height * scale))
    new_w = max(1, round(width * scale))
    # BOX averages every source pixel a target pixel covers: anti-aliasing for shrinking;
    # for enlarging a tiny drawing it is plain nearest-neighbour, hence LANCZOS there.
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS
    small = np.asarray(Image.fromarray(cropped, mode="F").resize((new_w, new_h), resample),
                       dtype=np.float32)
    small = np.clip(small, 0.0, None)
    if small.max() > 0:
        small /= small.max()
    # Centre of mass to pixel (14, 14), where MNIST's digits have theirs (their mean over the
    # test set is (13.99, 14.01)); an integer shift, as MNIST did.
    mass = small.sum()
    centre_r = (small.sum(axis=1) @ np.arange(new_h)) / mass
    centre_c = (small.sum(axis=0) @ np.arange(new_w)) / mass
    top = round(MASS_CENTRE - centre_r)
    left = round(MASS_CENTRE - centre_c)
    frame = np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    src_r0, src_c0 = max(0, -top), max(0, -left)
    dst_r0, dst_c0 = max(0, top), max(0, left)
    span_r = min(new_h - src_r0, IMAGE_SIDE - dst_r0)
    span_c = min(new_w - src_c0, IMAGE_SIDE - dst_c0)
    frame[dst_r0:dst_r0 + span_r, dst_c0:dst_c0 + span_c] = \
        small[src_r0:src_r0 + span_r, src_c0:src_c0 + span_c]
    return np.rint(frame * 255.0).astype(np.uint8)


def image_to_mnist(image) -> np.ndarray:
    """A PIL image of a drawing (any size) to a 28x28 uint8 MNIST-like digit."""
    return to_mnist(ink_from_image(image))
