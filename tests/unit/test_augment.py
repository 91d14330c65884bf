"""Augmentation on tiny arrays: shapes, dtypes, determinism, ranges, and no fold leakage."""

import numpy as np
import pytest
from pydantic import ValidationError

from mlpaint.images.augment import (
    AffineAugment,
    AsDrawnAugment,
    AugmentSpec,
    ElasticAugment,
    StrokeAugment,
    affine_matrices,
    augment,
    change_stroke,
    elastic_fields,
    fold_training_rows,
    render_as_drawn,
    warp,
)
from mlpaint.training.spec import KFolds, MldbFolds, plan_folds

OFF = {"elastic": ElasticAugment(probability=0), "affine": AffineAugment(probability=0),
       "stroke": StrokeAugment(probability=0), "as_drawn": AsDrawnAugment(probability=0)}


def only(name: str, **fields) -> AugmentSpec:
    """One copy per row with just one transform, always applied."""
    chosen = {**OFF, name: type(OFF[name])(probability=1.0, **fields)}
    return AugmentSpec(copies=1, **chosen)


def _stroke_digit(column: int = 12) -> np.ndarray:
    """A thick vertical bar with a foot: something with a centre line to trace."""
    image = np.zeros((28, 28), dtype=np.uint8)
    image[5:23, column:column + 3] = 255
    image[20:23, column - 4:column + 7] = 255
    return image


@pytest.fixture
def images():
    rng = np.random.default_rng(7)
    stack = np.stack([_stroke_digit(c) for c in (8, 10, 12, 14, 16, 18)])
    noise = rng.integers(0, 60, stack.shape, dtype=np.uint8) * (stack > 0)
    return (stack - noise).astype(np.uint8)


def test_shapes_dtypes_and_sources(images):
    spec = AugmentSpec(copies=3)
    pixels, source = augment(images, spec, seed=0)
    assert pixels.shape == (18, 784) and pixels.dtype == np.uint8
    assert source.tolist() == [0, 1, 2, 3, 4, 5] * 3  # copy c of every row, then c + 1
    flat, flat_source = augment(images.reshape(-1, 784), spec, seed=0)
    assert np.array_equal(flat, pixels) and np.array_equal(flat_source, source)
    assert augment(images, AugmentSpec(copies=0), seed=0)[0].shape == (0, 784)


def test_labels_follow_their_source_rows(images):
    labels = np.arange(6) * 10
    _, source = augment(images, AugmentSpec(copies=2), seed=1)
    assert labels[source].tolist() == [0, 10, 20, 30, 40, 50] * 2


def test_same_seed_same_copies_other_seed_other_copies(images):
    spec = AugmentSpec(copies=2)
    first, _ = augment(images, spec, seed=3)
    again, _ = augment(images, spec, seed=3)
    other, _ = augment(images, spec, seed=4)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_wrong_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        augment(np.zeros((2, 784), dtype=np.float32), AugmentSpec(copies=1), 0)
    with pytest.raises(ValueError, match="N x 784"):
        augment(np.zeros((2, 27, 27), dtype=np.uint8), AugmentSpec(copies=1), 0)


def test_spec_validation_names_the_range():
    with pytest.raises(ValidationError, match=r"stroke.strength: the minimum 0.9 is above"):
        AugmentSpec(stroke=StrokeAugment(min_strength=0.9, max_strength=0.5))
    with pytest.raises(ValidationError, match=r"as_drawn.stroke: the minimum 0.3 is above"):
        AugmentSpec(as_drawn=AsDrawnAugment(min_stroke=0.3, max_stroke=0.1))
    with pytest.raises(ValidationError, match="copies"):
        AugmentSpec(copies=-1)
    with pytest.raises(ValidationError, match="probability"):
        AugmentSpec(elastic=ElasticAugment(probability=1.5))
    with pytest.raises(ValidationError, match="scale_min"):
        AffineAugment(scale_min=1.1)  # the shrinking end cannot enlarge


def test_affine_parameters_stay_within_their_ranges():
    spec = AffineAugment(max_rotation_deg=20, scale_min=0.8, scale_max=1.2, max_shear_deg=0)
    matrices = affine_matrices(np.random.default_rng(0), 2000, spec)
    scale = np.sqrt(np.linalg.det(matrices))  # rotation and shear keep areas
    angle = np.rad2deg(np.arctan2(matrices[:, 1, 0], matrices[:, 0, 0]))
    assert scale.min() >= 0.8 - 1e-9 and scale.max() <= 1.2 + 1e-9
    assert np.abs(angle).max() <= 20 + 1e-9 and np.abs(angle).max() > 18  # the range is used
    sheared = affine_matrices(np.random.default_rng(0), 2000,
                              AffineAugment(max_rotation_deg=0, scale_min=1, scale_max=1,
                                            max_shear_deg=10))
    slant = np.rad2deg(np.arctan(sheared[:, 1, 0]))
    assert np.abs(slant).max() <= 10 + 1e-9 and np.allclose(sheared[:, 0], [1, 0])


def test_warp_identity_and_integer_shift(images):
    identity = np.repeat(np.eye(2)[None], len(images), axis=0)
    assert np.array_equal(warp(images, identity, np.zeros((len(images), 2))), images)
    shifted = warp(images, identity, np.tile([2.0, -3.0], (len(images), 1)))
    assert np.array_equal(shifted[:, 2:, :25], images[:, :26, 3:])


def test_affine_copies_keep_ink_and_shift_within_range(images):
    spec = only("affine", max_shift_px=2, max_rotation_deg=0, scale_min=1, scale_max=1,
                max_shear_deg=0)
    copies, _ = augment(images, spec, seed=5)

    def centre(stack):
        stack = stack.reshape(-1, 28, 28).astype(float)
        cols = (stack.sum(axis=1) * np.arange(28)).sum(axis=1) / stack.sum(axis=(1, 2))
        rows = (stack.sum(axis=2) * np.arange(28)).sum(axis=1) / stack.sum(axis=(1, 2))
        return np.stack([rows, cols], 1)

    moved = np.abs(centre(copies) - centre(images))
    assert moved.max() <= 2.0 + 0.05 and moved.max() > 0.5
    ink_ratio = copies.reshape(6, -1).sum(1) / images.reshape(6, -1).sum(1)
    assert np.all((ink_ratio > 0.95) & (ink_ratio < 1.05))  # bilinear shifts keep the mass


def test_elastic_displacements_are_bounded_by_alpha():
    fields = elastic_fields(np.random.default_rng(0), 50, ElasticAugment(alpha=10, sigma=3))
    assert fields.shape == (50, 2, 28, 28)
    assert np.abs(fields).max() <= 10 and np.abs(fields).max() > 0.5


def test_stroke_thicker_adds_ink_thinner_removes_it(images):
    thicker = change_stroke(images, np.ones(6, bool), np.ones(6))
    thinner = change_stroke(images, np.zeros(6, bool), np.ones(6))
    lit = (images > 64).sum(axis=(1, 2))
    assert np.all((thicker > 64).sum(axis=(1, 2)) > lit)
    assert np.all((thinner > 64).sum(axis=(1, 2)) < lit)
    assert np.array_equal(thinner.max(axis=(1, 2)), images.max(axis=(1, 2)))  # not fainter
    unchanged = change_stroke(images, np.ones(6, bool), np.zeros(6))
    assert np.array_equal(unchanged, images)


def test_as_drawn_redraws_with_a_uniform_pen_centred_like_mnist(images):
    thin = render_as_drawn(images[0], 0.06)
    thick = render_as_drawn(images[0], 0.22)
    assert thin.shape == thick.shape == (28, 28) and thin.dtype == np.uint8
    assert (thick > 128).sum() > (thin > 128).sum()  # a wider pen leaves more ink
    for digit in (thin, thick):
        mass = digit.astype(float)
        rows = (mass.sum(axis=1) @ np.arange(28)) / mass.sum()
        cols = (mass.sum(axis=0) @ np.arange(28)) / mass.sum()
        assert abs(rows - 14) <= 1 and abs(cols - 14) <= 1  # the app's preprocessing placed it
        inked_rows = np.flatnonzero((digit > 0).any(axis=1))
        assert inked_rows[-1] - inked_rows[0] + 1 >= 19  # scaled to MNIST's 20-pixel box
    blank = np.zeros((28, 28), dtype=np.uint8)
    assert np.array_equal(render_as_drawn(blank, 0.1), blank)


@pytest.mark.parametrize("folds", [MldbFolds(), KFolds(k=3)])
def test_no_copy_of_a_test_row_trains_its_fold(folds):
    rng = np.random.default_rng(11)
    row_hash = rng.integers(0, 2**63, 300, dtype=np.uint64)
    images = rng.integers(0, 255, (300, 28, 28), dtype=np.uint8)
    _, source = augment(images, only("affine"), seed=0)
    _, source2 = augment(images, AugmentSpec(copies=2), seed=0)
    for copies_source in (source, source2):
        for plan in plan_folds(folds, row_hash):
            chosen = fold_training_rows(plan.train_rows, copies_source)
            sources = set(copies_source[chosen].tolist())
            assert sources == set(plan.train_rows.tolist())  # every training row's copies...
            assert sources.isdisjoint(plan.test_rows.tolist())  # ...and no test row's
