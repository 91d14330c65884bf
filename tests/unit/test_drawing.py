"""The one rendering path: strokes drawn as the page draws them, placed upright on its
canvas, brought to the model's input by the server's preprocessing."""

import re
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mlpaint.images.drawing import (
    CANVAS_SIDE,
    PAGE_PEN_WIDTH,
    PenStyle,
    drawn_digit,
    place_on_canvas,
    render_strokes,
)
from mlpaint.images.preprocess import ink_from_image

STATIC = Path(__file__).resolve().parents[2] / "mlpaint" / "serving" / "static"


def _ink(image) -> np.ndarray:
    return ink_from_image(image)


def test_the_page_draws_what_render_strokes_draws():
    """The contract with the page: its canvas's size, its pen's width, round caps and joins,
    black on a white fill. A change to the page that breaks it breaks this test."""
    html, script = (STATIC / "index.html").read_text(), (STATIC / "page.js").read_text()
    assert f'width="{CANVAS_SIDE}" height="{CANVAS_SIDE}"' in html
    assert re.search(rf'lineWidth = tool === "pen" \? {PAGE_PEN_WIDTH} :', script)
    assert 'ctx.lineCap = ctx.lineJoin = "round"' in script
    assert 'ctx.strokeStyle = tool === "pen" ? "#000"' in script
    assert 'ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, pad.width, pad.height)' in script


def test_a_segment_is_as_wide_as_the_pen_with_round_caps():
    ink = _ink(render_strokes([np.array([[100.0, 140.0], [180.0, 140.0]])], 20))
    column = ink[:, 140]
    assert abs(float(column.sum()) - 20) < 1.5  # the band across the segment: the pen's width
    row = ink[140]
    inked = np.flatnonzero(row > 0.5)
    # Round caps reach half the pen beyond each end point.
    assert abs(inked[0] - 90) <= 1 and abs(inked[-1] - 190) <= 1
    # ...and are round: at 8 px from the axis, a cap is narrower than the pen's half.
    assert ink[132, 91] < 0.5 and ink[132, 100] > 0.5


def test_a_tap_is_a_dot_of_the_pens_diameter():
    ink = _ink(render_strokes([np.array([[140.0, 140.0]])], PAGE_PEN_WIDTH))
    rows = np.flatnonzero(ink.max(axis=1) > 0.5)
    assert abs(len(rows) - PAGE_PEN_WIDTH) <= 1
    assert abs(float(ink.sum()) - np.pi * (PAGE_PEN_WIDTH / 2) ** 2) < 0.05 * ink.sum()


def test_the_tablets_y_points_up_the_canvas_y_down():
    """A stroke that rises on the tablet (y grows) runs up the canvas (y shrinks)."""
    rising = [np.array([[0, 0], [0, 100]])]
    placed = place_on_canvas(rising, height_px=100, tilt_deg=0, pen_px=10,
                             rng=np.random.default_rng(0))[0]
    assert placed[1, 1] < placed[0, 1]
    assert abs(abs(placed[1, 1] - placed[0, 1]) - 100) < 1e-6


@settings(max_examples=60, deadline=None)
@given(height=st.floats(0.05, 0.95), tilt=st.floats(-30, 30), pen=st.floats(1, 60),
       wide=st.floats(0.01, 20), seed=st.integers(0, 2**32 - 1))
def test_a_placed_digit_and_its_pen_stay_on_the_canvas(height, tilt, pen, wide, seed):
    strokes = [np.array([[0, 0], [100 * wide, 100], [0, 50]]), np.array([[30, 30]])]
    placed = place_on_canvas(strokes, height_px=height * CANVAS_SIDE, tilt_deg=tilt,
                             pen_px=pen, rng=np.random.default_rng(seed))
    every = np.concatenate(placed)
    assert every.min() >= pen / 2 - 1e-6
    assert every.max() <= CANVAS_SIDE - pen / 2 + 1e-6


def test_a_rendering_is_a_function_of_its_seed():
    strokes = [np.array([[100, 400], [300, 400], [200, 100]])]
    first = drawn_digit(strokes, PenStyle(), np.random.default_rng(7))
    again = drawn_digit(strokes, PenStyle(), np.random.default_rng(7))
    other = drawn_digit(strokes, PenStyle(), np.random.default_rng(8))
    assert first.shape == (28, 28) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_a_seven_is_drawn_upright():
    """A 7 on the tablet (its bar on top: large y) has its ink's top row wide and its bottom
    narrow once drawn: the flip is right."""
    seven = [np.array([[100, 400], [300, 400], [150, 0]])]
    digit = drawn_digit(seven, PenStyle(max_tilt_deg=0), np.random.default_rng(1))
    rows = np.flatnonzero(digit.max(axis=1) > 64)
    top, bottom = digit[rows[0] + 1], digit[rows[-1] - 1]
    assert (top > 64).sum() > 2 * (bottom > 64).sum()
