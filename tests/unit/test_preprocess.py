"""The drawing-to-MNIST function, checked on MNIST digits drawn large and brought back."""

import numpy as np
import pytest
from PIL import Image

from mlpaint.images.preprocess import image_to_mnist, to_mnist


def _mnist_test_digits(shared_mnist, count):
    from bench.train import _read_idx

    images = _read_idx(shared_mnist / "t10k-images-idx3-ubyte.gz")[:count]
    labels = _read_idx(shared_mnist / "t10k-labels-idx1-ubyte.gz")[:count]
    return images, labels


def _draw_large(digit: np.ndarray, scale: int, canvas=(400, 360), at=(37, 61)) -> Image.Image:
    """The digit as a person would draw it: dark ink on a white canvas, much larger, off
    centre."""
    big = Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR)
    ink = np.asarray(big, dtype=np.float32) / 255.0
    page = np.ones((canvas[1], canvas[0]), dtype=np.float32)
    page[at[1]:at[1] + ink.shape[0], at[0]:at[0] + ink.shape[1]] -= ink
    return Image.fromarray(np.clip(page * 255, 0, 255).astype(np.uint8), mode="L")


def test_mnist_digits_drawn_large_come_back(shared_mnist):
    images, _ = _mnist_test_digits(shared_mnist, 200)
    errors, correlations = [], []
    for digit in images:
        back = image_to_mnist(_draw_large(digit, scale=10))
        assert back.shape == (28, 28) and back.dtype == np.uint8
        errors.append(np.abs(back.astype(float) - digit).mean())
        correlations.append(np.corrcoef(back.ravel(), digit.ravel())[0, 1])
    # MNIST digits are themselves 20-px boxes centred by mass, so the round trip nearly
    # reproduces them; grey levels differ only where resampling rounds differently.
    assert np.median(correlations) > 0.95
    assert np.median(errors) < 12


def test_geometry_matches_mnist():
    ink = np.zeros((300, 120), dtype=np.float32)
    ink[20:280, 40:80] = 1.0  # a tall bar, off centre
    digit = to_mnist(ink)
    rows = np.flatnonzero(digit.max(axis=1) > 0)
    cols = np.flatnonzero(digit.max(axis=0) > 0)
    assert len(rows) == 20 and len(cols) <= 5  # longer side 20 px, aspect kept
    weights = digit.astype(float)
    centre = ((weights.sum(1) @ np.arange(28)) / weights.sum(),
              (weights.sum(0) @ np.arange(28)) / weights.sum())
    assert abs(centre[0] - 14) <= 0.5 and abs(centre[1] - 14) <= 0.5
    assert digit.max() == 255


def test_transparent_background_and_light_background_agree():
    stroke = np.zeros((100, 100), dtype=np.uint8)
    stroke[20:80, 45:55] = 255
    transparent = np.zeros((100, 100, 4), dtype=np.uint8)
    transparent[..., 3] = stroke  # black ink, alpha where drawn
    white = np.full((100, 100), 255, dtype=np.uint8) - stroke
    a = image_to_mnist(Image.fromarray(transparent, mode="RGBA"))
    b = image_to_mnist(Image.fromarray(white, mode="L"))
    assert np.array_equal(a, b) and a.max() == 255


def test_grey_levels_survive():
    rows, cols = np.mgrid[:200, :200]
    radius = np.hypot(rows - 100, cols - 100)
    ink = ((radius > 60) & (radius < 80)).astype(np.float32)  # a hard-edged "0"
    digit = to_mnist(ink)
    # anti-aliased edges, not a binarised stroke
    assert ((digit > 0) & (digit < 200)).sum() > 20


@pytest.mark.parametrize("blank", [np.zeros((50, 50)), np.full((10, 10), np.nan)])
def test_blank_or_invalid_drawing_gives_a_blank_digit(blank):
    assert not to_mnist(blank).any()


def test_shape_is_checked():
    with pytest.raises(ValueError, match="2-D image"):
        to_mnist(np.zeros((3, 3, 3)))


def test_something_drawn_tells_digits_from_dots_and_smudges():
    from mlpaint.images.preprocess import something_drawn

    blank = np.zeros((280, 280))
    assert not something_drawn(blank)
    dot = blank.copy()
    dot[130:148, 130:148] = 1.0  # a tap of the page's 18 px pen
    assert not something_drawn(dot)
    faint = blank.copy()
    faint[40:240, 100:120] = 0.15  # a smudge lighter than any pen stroke
    assert not something_drawn(faint)
    one = blank.copy()
    one[40:240, 130:148] = 1.0  # a "1": tall and narrow
    assert something_drawn(one)
    small_digit = np.zeros((28, 28))
    small_digit[10:15, 12:14] = 1.0  # five pixels tall on a 28x28 input
    assert something_drawn(small_digit)
    speck = np.zeros((28, 28))
    speck[5, 5] = 1.0
    assert not something_drawn(speck)
