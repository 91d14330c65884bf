"""Data tests of the pen drawings mlpaint ships and trains on: the packaged copy of UCI's
training portion is the pinned one, and it holds what every later step relies on (labels,
writers, shapes, no duplicates), and its renderings look like digits drawn on the page."""

import hashlib

import numpy as np
import pytest

from mlpaint.data.pendigits import drawn_test_writers
from mlpaint.images.drawing import PenStyle, drawn_digit
from mlpaint.images.preprocess import MASS_CENTRE

pytestmark = pytest.mark.data

PUBLISHED_LABEL_COUNTS = [780, 779, 780, 719, 780, 720, 720, 778, 719, 719]  # UCI's README
TABLET_SIDE = 500  # every digit was written inside a 500 x 500 box of tablet units


def test_the_packaged_copy_is_uci_training_portion(pen_table):
    assert len(pen_table) == 7494
    assert pen_table.label_counts() == PUBLISHED_LABEL_COUNTS
    assert sorted(set(pen_table.writers.tolist())) == list(range(1, 31))


def test_every_writer_drew_every_digit_about_equally(pen_table):
    for writer in np.unique(pen_table.writers):
        counts = np.bincount(pen_table.labels[pen_table.writers == writer], minlength=10)
        assert counts.min() >= 20, (writer, counts)
        assert 240 <= counts.sum() <= 250, (writer, counts)


def test_keys_are_unique_and_points_lie_on_the_tablet(pen_table):
    assert len(set(pen_table.row_keys)) == len(pen_table)
    assert pen_table.points.min() >= 0 and pen_table.points.max() < TABLET_SIDE
    strokes_per_digit = np.diff(pen_table.digit_ends, prepend=0)
    assert strokes_per_digit.min() >= 1 and strokes_per_digit.max() <= 10
    points_per_digit = np.array([sum(len(s) for s in pen_table.strokes(r))
                                 for r in range(len(pen_table))])
    assert points_per_digit.min() >= 2  # a digit is more than a tap


def test_no_digit_is_recorded_twice(pen_table):
    """Two rows with the same strokes would put one drawing on both sides of a fold."""
    digests = {hashlib.sha256(np.ascontiguousarray(np.concatenate(pen_table.strokes(r)))
                              .tobytes()).hexdigest() for r in range(len(pen_table))}
    assert len(digests) == len(pen_table)


def test_the_drawn_test_writers_have_every_digit(pen_table):
    held_out = drawn_test_writers(pen_table.writers.tolist(), 0.2)
    assert len(held_out) == 6
    test_rows = np.isin(pen_table.writers, sorted(held_out))
    assert np.bincount(pen_table.labels[test_rows], minlength=10).min() >= 100
    # ...and the other 24 writers keep enough of each digit to train on.
    assert np.bincount(pen_table.labels[~test_rows], minlength=10).min() >= 500


def test_renderings_are_digits_as_the_server_makes_them(pen_table):
    rng = np.random.default_rng(0)
    rows = rng.choice(len(pen_table), 200, replace=False)
    digits = np.stack([drawn_digit(pen_table.strokes(r), PenStyle(), rng) for r in rows])
    assert digits.shape == (200, 28, 28) and digits.dtype == np.uint8
    ink = digits.reshape(200, -1).astype(np.float64)
    assert (ink.max(axis=1) == 255).all()  # the server's preprocessing scales to full ink
    mass = ink.sum(axis=1)
    grid = np.arange(28)
    centre_rows = (digits.sum(axis=2) @ grid) / mass
    centre_cols = (digits.sum(axis=1) @ grid) / mass
    assert np.abs(centre_rows - MASS_CENTRE).max() <= 1.0
    assert np.abs(centre_cols - MASS_CENTRE).max() <= 1.0
    # Its box: 20 pixels on its longer side, as MNIST's.
    longer = [max(np.ptp(np.flatnonzero(d.max(axis=1) > 0)),
                  np.ptp(np.flatnonzero(d.max(axis=0) > 0))) + 1 for d in digits]
    assert min(longer) >= 19 and max(longer) <= 22
