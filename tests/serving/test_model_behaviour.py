"""Behavioural tests of a small model trained as the default spec trains: MNIST digits plus
augmented copies. Invariances people rely on when they draw: a digit moved, drawn thicker or
thinner, or tilted keeps its label.

The model learns from 8,000 training digits and one augmented copy of each (the default
spec's augmentation) and scores about 98% on the first 600 clean test digits, so the bounds
are on the digits it reads right when clean: of those, at least 90% must keep their label
under each change. Measured with the `moments` stage: moved 2 px 100% (the stage recentres
every digit), thicker (a full 3x3 grey dilation, about 2 px wider) 96.9%, thinner (three
quarters of a 3x3 erosion; a full one erases MNIST's 2-pixel strokes outright) 96.6%,
tilted ±10° 98.1% and 98.6% (with `deskew`: 95.9%, 96.2% and 97.1%). Each change lies inside
the augmentation's ranges; 90% leaves room for noise and still fails on a real
regression."""

import numpy as np
import pytest

from mlpaint.augment import augment, change_stroke, warp
from mlpaint.data.catalog import Split
from mlpaint.features import apply_feature_stage
from mlpaint.training.algorithms import GbdtConfig, train_model
from mlpaint.training.spec import load_spec

TRAIN_ROWS = 8000
TEST_ROWS = 600
KEEP_BOUND = 0.90


@pytest.fixture(scope="module")
def robust_model(mnist_tables):
    spec = load_spec()  # the packaged default, with its augment section
    assert spec.augment.copies >= 1
    train = mnist_tables[Split.TRAIN]
    pixels, labels = np.asarray(train.pixels[:TRAIN_ROWS]), train.labels[:TRAIN_ROWS]
    copies, source = augment(pixels, spec.augment, seed=0)
    features = apply_feature_stage(spec.features, np.concatenate([pixels, copies]))
    config = GbdtConfig(rounds=80, params={"num_leaves": 15, "learning_rate": 0.2,
                                           "feature_fraction": 0.3, "max_bin": 63})
    model = train_model("lgbm", config, features, np.concatenate([labels, labels[source]]),
                        feature_stage=spec.features, seed=0, num_threads=2)
    return model, spec.features


@pytest.fixture(scope="module")
def clean_right(robust_model, mnist_tables):
    model, stage = robust_model
    test = mnist_tables[Split.TEST]
    images = np.asarray(test.pixels[:TEST_ROWS]).reshape(-1, 28, 28)
    labels = test.labels[:TEST_ROWS]
    predicted = model.predict_proba(apply_feature_stage(stage, images)).argmax(axis=1)
    right = predicted == labels
    assert right.mean() > 0.93, f"clean accuracy {right.mean():.3f}"
    return images[right], labels[right]


def _kept(robust_model, images, labels) -> float:
    model, stage = robust_model
    predicted = model.predict_proba(apply_feature_stage(stage, images)).argmax(axis=1)
    return float((predicted == labels).mean())


def _rotation(degrees: float, n: int) -> np.ndarray:
    theta = np.deg2rad(degrees)
    matrix = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return np.repeat(matrix[None], n, axis=0)


@pytest.mark.parametrize("shift", [(2, 0), (0, -2), (-2, 2)])
def test_a_digit_moved_two_pixels_keeps_its_label(robust_model, clean_right, shift):
    images, labels = clean_right
    moved = warp(images, _rotation(0, len(images)), np.tile(shift, (len(images), 1)))
    kept = _kept(robust_model, moved, labels)
    assert kept >= KEEP_BOUND, f"shift {shift}: kept {kept:.3f}"


@pytest.mark.parametrize("thicker", [True, False], ids=["thicker", "thinner"])
def test_a_digit_drawn_thicker_or_thinner_keeps_its_label(robust_model, clean_right, thicker):
    images, labels = clean_right
    strength = 1.0 if thicker else 0.75
    changed = change_stroke(images, np.full(len(images), thicker),
                            np.full(len(images), strength))
    kept = _kept(robust_model, changed, labels)
    assert kept >= KEEP_BOUND, f"thicker={thicker}: kept {kept:.3f}"


@pytest.mark.parametrize("degrees", [10, -10])
def test_a_digit_tilted_ten_degrees_keeps_its_label(robust_model, clean_right, degrees):
    images, labels = clean_right
    tilted = warp(images, _rotation(degrees, len(images)), np.zeros((len(images), 2)))
    kept = _kept(robust_model, tilted, labels)
    assert kept >= KEEP_BOUND, f"tilt {degrees}°: kept {kept:.3f}"
