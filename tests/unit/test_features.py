import numpy as np
import pytest

from mlpaint.features import FeatureStage, apply_feature_stage


def _reference_deskew(image: np.ndarray) -> np.ndarray:
    """The textbook deskew with scipy, kept here as the oracle for the compiled one."""
    from scipy.ndimage import affine_transform

    image = image.astype(np.float64)
    rows, cols = np.mgrid[:28, :28]
    total = image.sum()
    centre_r, centre_c = (rows * image).sum() / total, (cols * image).sum() / total
    var_r = ((rows - centre_r) ** 2 * image).sum() / total
    cov = ((rows - centre_r) * (cols - centre_c) * image).sum() / total
    affine = np.array([[1, 0], [cov / var_r, 1]])
    offset = np.array([centre_r, centre_c]) - affine @ np.array([14.0, 14.0])
    # grid-constant: a sample near the edge is interpolated with blank ink beyond it (scipy's
    # "constant" would blank the whole sample instead).
    return affine_transform(image, affine, offset=offset, order=1, mode="grid-constant",
                            cval=0.0)


def _slanted_stroke(shift: int = 0) -> np.ndarray:
    image = np.zeros((28, 28), dtype=np.uint8)
    for row in range(4, 24):
        col = 8 + row // 2 + shift
        image[row, col:col + 3] = 255
    return image


def test_raw_is_the_pixels_as_float32():
    pixels = np.arange(784, dtype=np.uint32).astype(np.uint8)[None, :]
    features = apply_feature_stage("raw", pixels)
    assert features.dtype == np.float32 and np.array_equal(features, pixels.astype(np.float32))


def test_deskew_matches_the_scipy_reference():
    # Strokes, and blotches of random ink anywhere in the frame (so digits off-centre, where
    # the shear samples past the edges).
    blotches = np.random.default_rng(0).integers(0, 256, (20, 28, 28)).astype(np.uint8)
    blotches[np.random.default_rng(1).random((20, 28, 28)) < 0.8] = 0
    images = np.concatenate([np.stack([_slanted_stroke(0), _slanted_stroke(3)]), blotches])
    features = apply_feature_stage(FeatureStage.DESKEW, images)
    for image, row in zip(images, features, strict=True):
        assert np.abs(row - _reference_deskew(image).ravel()).max() < 1e-3


def test_deskew_straightens_a_slanted_stroke():
    image = _slanted_stroke()
    deskewed = apply_feature_stage("deskew", image[None]).reshape(28, 28)

    def ink_columns(img):
        weights = img.astype(float)
        cols = np.arange(28)
        return [float((weights[r] * cols).sum() / weights[r].sum())
                for r in range(28) if weights[r].sum() > 0]

    before, after = ink_columns(image), ink_columns(deskewed)
    assert np.ptp(before) > 8 and np.ptp(after) < 2  # the slant is gone


def test_blank_image_stays_blank_and_shapes_are_checked():
    assert not apply_feature_stage("deskew", np.zeros((1, 784), np.uint8)).any()
    with pytest.raises(ValueError, match="expected N x 784"):
        apply_feature_stage("raw", np.zeros((2, 100), np.uint8))


def test_a_large_matrix_split_across_threads_is_deskewed_row_for_row(monkeypatch):
    import mlpaint.features as features_module

    images = np.random.default_rng(2).integers(0, 256, (300, 28, 28)).astype(np.uint8)
    images[np.random.default_rng(3).random(images.shape) < 0.8] = 0
    whole = apply_feature_stage(FeatureStage.DESKEW, images)  # 300 rows: one thread
    monkeypatch.setattr(features_module, "_ROWS_PER_THREAD", 64)
    monkeypatch.setattr(features_module.os, "cpu_count", lambda: 3)  # blocks of 100 rows
    split = apply_feature_stage(FeatureStage.DESKEW, images)
    assert np.array_equal(split, whole)
    assert np.array_equal(split[150], apply_feature_stage(FeatureStage.DESKEW, images[150:151])[0])
