"""Pen drawings as training rows and as the drawn test set: plain functions on a pen table
and the spec, shared by the training flow's task and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlpaint.data.pendigits import PenTable
from mlpaint.images.augment import AugmentSpec, augment
from mlpaint.images.drawing import (
    DrawnTestSet,
    drawn_test_rows,
    drawn_test_set,
    render_rows,
)
from mlpaint.training.spec import PenSpec


@dataclass(frozen=True)
class PenDrawings:
    """The training writers' renderings then their augmented copies (pixels, the table row
    each was drawn from), and the drawn test set; the writers of each part."""

    train_pixels: np.ndarray
    train_source: np.ndarray
    drawn: DrawnTestSet
    train_writers: list[int]
    drawn_writers: list[int]


def draw_pen_digits(table: PenTable, pen: PenSpec, augment_spec: AugmentSpec,
                    seed: int) -> PenDrawings:
    """The held-out writers' digits drawn once each (the drawn test set), every other
    writer's `pen.renderings` times with the spec's style, then augmented as MNIST's rows
    are."""
    drawn_rows = drawn_test_rows(table, pen.test_share)
    train_rows = np.setdiff1d(np.arange(len(table)), drawn_rows)
    pixels, source = render_rows(table, train_rows, renderings=pen.renderings,
                                 style=pen.style, seed=seed)
    if augment_spec.copies and len(source):
        extra, copied_from = augment(pixels, augment_spec, seed)
        pixels = np.concatenate([pixels, extra])
        source = np.concatenate([source, source[copied_from]])
    return PenDrawings(pixels, source, drawn_test_set(table, pen.test_share),
                       np.unique(table.writers[train_rows]).tolist(),
                       np.unique(table.writers[drawn_rows]).tolist())


def pen_rows_expected(table: PenTable, pen: PenSpec, augment_spec: AugmentSpec
                      ) -> tuple[int, int]:
    """How many training rows `draw_pen_digits` makes of the table, and how many of them,
    at the start, are renderings rather than augmented copies."""
    rendered = (len(table) - len(drawn_test_rows(table, pen.test_share))) * pen.renderings
    return rendered * (1 + (augment_spec.copies if pen.renderings else 0)), rendered
