"""The exploration helpers on tiny arrays."""

import numpy as np

from mlpaint.data.explore import sample_indices, sample_mosaic


def test_sample_indices_are_seeded_and_per_label():
    labels = np.array([d for d in range(10) for _ in range(5)] + [3] * 20)
    first = sample_indices(labels, 4, seed=7)
    assert [len(rows) for rows in first] == [4] * 10
    assert all((labels[rows] == digit).all() for digit, rows in enumerate(first))
    again = sample_indices(labels, 4, seed=7)
    assert all((a == b).all() for a, b in zip(first, again, strict=True))


def test_mosaic_places_each_sample_in_its_cell():
    images = np.arange(6 * 3 * 3, dtype=np.uint8).reshape(6, 3, 3) + 1
    chosen = [np.array([0, 1]), np.array([2]), np.array([3, 4, 5])]  # the last row overflows
    mosaic = sample_mosaic(images, chosen, per_label=2, gap=1)
    assert mosaic.shape == (3 * 4 - 1, 2 * 4 - 1)
    assert (mosaic[0:3, 0:3] == images[0]).all() and (mosaic[0:3, 4:7] == images[1]).all()
    assert (mosaic[4:7, 0:3] == images[2]).all()
    assert (mosaic[4:7, 4:7] == 0).all()  # digit 1 had one sample: the second cell is blank
    assert (mosaic[8:11, 4:7] == images[4]).all()  # only per_label samples are drawn
    assert (mosaic[3, :] == 0).all() and (mosaic[:, 3] == 0).all()  # the gaps stay blank


def test_label_grid_draws_each_digits_samples_dark_on_white_in_its_row(tmp_path):
    from PIL import Image

    from mlpaint.data.explore import render_label_grid

    labels = np.repeat(np.arange(10), 2)
    images = np.zeros((20, 28, 28), dtype=np.uint8)
    images[labels == 7] = 255  # only the sevens have ink: their row is black, others white
    grid = render_label_grid(images, labels, tmp_path / "grid.png", title="t", per_label=2)
    drawn = np.asarray(Image.open(grid).convert("L"))
    mosaic_rows = 10 * 30 - 2  # 28-pixel cells, 2-pixel gaps
    assert drawn.shape == (28 + 2 * mosaic_rows, 24 + 2 * (2 * 30 - 2))
    cell = drawn[28:, 24:]  # below the title band, right of the labels
    sevens = cell[7 * 60: 7 * 60 + 56, :56]
    sixes = cell[6 * 60: 6 * 60 + 56, :56]
    assert (sevens == 0).all() and (sixes == 255).all()
    assert (drawn[28:, :24] < 128).any()  # the digit labels are drawn
