"""Strokes drawn the way the drawing page draws them, and brought to the model's input the
way the server brings a posted drawing: the one rendering path that the page's contract,
training on pen trajectories and the benchmarks share, so they cannot drift apart.

The page (`mlpaint/serving/static/index.html` and its `page.js`) holds a 280x280 canvas
filled white; its pen draws black straight segments between successive pointer positions,
`PAGE_PEN_WIDTH` wide, with round caps and joins. `render_strokes` draws the same segments
(supersampled, then averaged down, for the browser's anti-aliased edge); `drawn_digit`
places a trajectory on that canvas with a given pen, size, place and tilt and returns the
28x28 digit that `mlpaint.images.preprocess` makes of it, as the server does of the page's PNG.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlpaint.data.dataset import row_hashes
from mlpaint.data.pendigits import PenTable, drawn_test_writers
from mlpaint.data.pins import N_FEATURES
from mlpaint.images.preprocess import image_to_mnist

#: Bumped whenever rendering changes what it draws, so stored renderings are made again.
DRAWING_CODE_VERSION = "1"

CANVAS_SIDE = 280  # the page's canvas, pixels a side
PAGE_PEN_WIDTH = 18  # the page's pen, pixels
_SUPERSAMPLE = 2
_MARGIN_PX = 2  # between the pen's edge and the canvas's


def render_strokes(strokes: Sequence[np.ndarray], pen_width: float,
                   side: int = CANVAS_SIDE):
    """A white `side` x `side` greyscale PIL image with `strokes` drawn in black: each an
    (n, 2) array of canvas (x, y) points, y pointing down, joined by straight segments of a
    round pen `pen_width` pixels wide. A one-point stroke is a dot, as a tap on the page."""
    from PIL import Image, ImageDraw

    large = Image.new("L", (side * _SUPERSAMPLE, side * _SUPERSAMPLE), 255)
    draw = ImageDraw.Draw(large)
    width = pen_width * _SUPERSAMPLE
    # Pillow's ellipse covers its bounding box's last pixels too: half a pixel less each
    # side gives a disc of the pen's diameter, as the page's round cap is.
    radius = width / 2 - 0.5
    for stroke in strokes:
        points = [tuple(p) for p in (np.asarray(stroke, dtype=np.float64) * _SUPERSAMPLE)]
        if len(points) > 1:
            draw.line(points, fill=0, width=max(1, round(width)))
        # A disc at every point: the round caps and the round joins of the page's pen.
        for x, y in points:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=0)
    return large.resize((side, side), Image.Resampling.BOX)


class PenStyle(BaseModel):
    """The ranges a rendering draws its pen, size, place and tilt from: how differently
    people draw the same trajectory on the page."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_pen_px: float = Field(10.0, gt=0.0, le=60.0, description="narrowest pen, pixels")
    max_pen_px: float = Field(26.0, gt=0.0, le=60.0, description="widest pen, pixels")
    min_height: float = Field(0.40, gt=0.05, le=0.95,
                              description="smallest digit, as a share of the canvas's height")
    max_height: float = Field(0.85, gt=0.05, le=0.95,
                              description="largest digit, as a share of the canvas's height")
    max_tilt_deg: float = Field(8.0, ge=0.0, le=30.0, description="tilt, uniform ±")

    @model_validator(mode="after")
    def _ranges_ordered(self) -> PenStyle:
        if self.min_pen_px > self.max_pen_px:
            raise ValueError("min_pen_px exceeds max_pen_px")
        if self.min_height > self.max_height:
            raise ValueError("min_height exceeds max_height")
        return self


def place_on_canvas(strokes: Sequence[np.ndarray], *, height_px: float, tilt_deg: float,
                    pen_px: float, rng: np.random.Generator,
                    side: int = CANVAS_SIDE) -> list[np.ndarray]:
    """Tablet strokes (y up, any units) as canvas strokes (y down): the digit upright,
    `height_px` tall (less if it would not fit across), tilted by `tilt_deg`, and placed
    anywhere its pen stays on the canvas."""
    joined = np.concatenate([np.asarray(s, dtype=np.float64) for s in strokes])
    flip = np.array([1.0, -1.0])  # the tablet's y points up, the canvas's down
    low, high = (joined * flip).min(axis=0), (joined * flip).max(axis=0)
    centre = (low + high) / 2
    room = side - pen_px - 2 * _MARGIN_PX
    span = np.maximum(high - low, 1.0)
    scale = min(height_px / span[1], room / span[0])
    angle = np.deg2rad(tilt_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    placed = [((np.asarray(s, dtype=np.float64) * flip - centre) * scale) @ rotation.T
              for s in strokes]
    every = np.concatenate(placed)
    extent_low, extent_high = every.min(axis=0), every.max(axis=0)
    shrink = min(1.0, room / max(float((extent_high - extent_low).max()), 1.0))
    placed = [p * shrink for p in placed]
    extent_low, extent_high = extent_low * shrink, extent_high * shrink
    edge = pen_px / 2 + _MARGIN_PX
    lowest = edge - extent_low  # where the digit's centre may go, per axis
    highest = np.maximum(lowest, side - edge - extent_high)
    offset = rng.uniform(lowest, highest)
    return [p + offset for p in placed]


def draw_on_canvas(strokes: Sequence[np.ndarray], style: PenStyle,
                   rng: np.random.Generator):
    """A tablet trajectory as a person might have drawn it on the page — a pen width, a
    size, a place and a tilt drawn from `style` — as the page's canvas (a PIL image)."""
    pen = rng.uniform(style.min_pen_px, style.max_pen_px)
    height = rng.uniform(style.min_height, style.max_height) * CANVAS_SIDE
    tilt = rng.uniform(-style.max_tilt_deg, style.max_tilt_deg)
    return render_strokes(place_on_canvas(strokes, height_px=height, tilt_deg=tilt,
                                          pen_px=pen, rng=rng), pen)


def drawn_digit(strokes: Sequence[np.ndarray], style: PenStyle,
                rng: np.random.Generator) -> np.ndarray:
    """`draw_on_canvas`, brought to a 28x28 uint8 digit by the server's own preprocessing."""
    return image_to_mnist(draw_on_canvas(strokes, style, rng))


def rendering_rng(seed: int, copy: int, row_key: str) -> np.random.Generator:
    """The generator of one rendering of one digit: its seed, its number and the digit's
    row key, nothing else."""
    return np.random.default_rng([seed, copy, int(row_hashes([row_key])[0])])


def render_rows(table: PenTable, rows: np.ndarray, *, renderings: int, style: PenStyle,
                seed: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`renderings` renderings of each of the table's `rows` (`drawn_digit`): a
    (renderings x len(rows), 784) uint8 array, rendering 0 of every row first, and the table
    row each was made from. A rendering depends only on the seed, its number and its digit's
    row key, not on which other rows are rendered beside it."""
    rows = np.asarray(rows, dtype=np.int64)
    keys = table.row_keys
    jobs = [(int(row), copy) for copy in range(renderings) for row in rows.tolist()]

    def one(job: tuple[int, int]) -> np.ndarray:
        row, copy = job
        rng = rendering_rng(seed, copy, keys[row])
        return drawn_digit(table.strokes(row), style, rng).reshape(N_FEATURES)

    if not jobs:
        return np.empty((0, N_FEATURES), np.uint8), np.empty(0, np.int64)
    # Pillow's resampling lets go of the GIL: two threads render nearly twice as fast.
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        pixels = np.stack(list(pool.map(one, jobs)))
    return pixels, np.tile(rows, renderings)


#: The drawn test set is one rendering of each held-out writer's digit with the default
#: style and this seed, whatever a spec trains with, so every model, every run and the gate
#: score the very same drawings.
DRAWN_TEST_SEED = 0
DRAWN_TEST_STYLE = PenStyle()


@dataclass(frozen=True)
class DrawnTestSet:
    """The held-out writers' digits as drawn on the page: pixels (N x 784 uint8), labels,
    and the writer of each."""

    pixels: np.ndarray
    labels: np.ndarray
    writers: np.ndarray


def drawn_test_rows(table: PenTable, test_share: float) -> np.ndarray:
    """The table rows of the writers kept out of training (`drawn_test_writers`)."""
    return table.rows_of(drawn_test_writers(table.writers.tolist(), test_share))


def drawn_set_of_writers(table: PenTable, writers: Iterable[int]) -> DrawnTestSet:
    """The given writers' digits drawn as the drawn test set draws them: the same drawing
    of a digit whichever writers are chosen beside it."""
    pixels, source = render_rows(table, table.rows_of(writers), renderings=1,
                                 style=DRAWN_TEST_STYLE, seed=DRAWN_TEST_SEED)
    return DrawnTestSet(pixels, table.labels[source], table.writers[source])


def drawn_test_set(table: PenTable, test_share: float) -> DrawnTestSet:
    return drawn_set_of_writers(table, drawn_test_writers(table.writers.tolist(), test_share))
