"""Behavioural tests of the model a training run registered (tests/model/conftest.py: the
packaged default spec on 8,000 MNIST digits, loaded back from MLflow's registry).
Invariances people rely on when they draw: a digit moved, drawn thicker or thinner, or
tilted keeps its label.

The model reads about 98% of the first 600 clean test digits, so the bounds are on the digits
it reads right when clean: of those, at least 90% must keep their label under each change.
Each change lies inside the default augmentation's ranges (the `moments` stage also
recentres every digit), and every one was measured well above the bound; 90% leaves room for
noise and still fails on a real regression."""

import numpy as np
import pytest

from mlpaint.images.augment import change_stroke, warp
from tests.conftest import official_test_digits
from tests.model.conftest import RegisteredModel

pytestmark = pytest.mark.model

TEST_ROWS = 600
KEEP_BOUND = 0.90


@pytest.fixture(scope="module")
def clean_right(registered_model: RegisteredModel, shared_mnist):
    pixels, labels = official_test_digits(shared_mnist, TEST_ROWS)
    images = pixels.reshape(-1, 28, 28)
    right = registered_model.digits(images) == labels
    assert right.mean() > 0.95, f"clean accuracy {right.mean():.3f}"
    return images[right], labels[right]


def _kept(model: RegisteredModel, images, labels) -> float:
    return float((model.digits(images) == labels).mean())


def _rotation(degrees: float, n: int) -> np.ndarray:
    theta = np.deg2rad(degrees)
    matrix = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return np.repeat(matrix[None], n, axis=0)


@pytest.mark.parametrize("shift", [(2, 0), (0, -2), (-2, 2)])
def test_a_digit_moved_two_pixels_keeps_its_label(registered_model, clean_right, shift):
    images, labels = clean_right
    moved = warp(images, _rotation(0, len(images)), np.tile(shift, (len(images), 1)))
    kept = _kept(registered_model, moved, labels)
    assert kept >= KEEP_BOUND, f"shift {shift}: kept {kept:.3f}"


@pytest.mark.parametrize("thicker", [True, False], ids=["thicker", "thinner"])
def test_a_digit_drawn_thicker_or_thinner_keeps_its_label(registered_model, clean_right, thicker):
    images, labels = clean_right
    strength = 1.0 if thicker else 0.75
    changed = change_stroke(images, np.full(len(images), thicker),
                            np.full(len(images), strength))
    kept = _kept(registered_model, changed, labels)
    assert kept >= KEEP_BOUND, f"thicker={thicker}: kept {kept:.3f}"


@pytest.mark.parametrize("degrees", [10, -10])
def test_a_digit_tilted_ten_degrees_keeps_its_label(registered_model, clean_right, degrees):
    images, labels = clean_right
    tilted = warp(images, _rotation(degrees, len(images)), np.zeros((len(images), 2)))
    kept = _kept(registered_model, tilted, labels)
    assert kept >= KEEP_BOUND, f"tilt {degrees}°: kept {kept:.3f}"
