import numpy as np
import pytest

from mlpaint.model.features import MOMENT_EXTENT, FeatureStage, apply_feature_stage


def _shape_of(image: np.ndarray) -> tuple[float, float, float, float, float]:
    """Centre, shear and the spreads along rows and (after the shear) columns, in numpy."""
    image = image.astype(np.float64)
    rows, cols = np.mgrid[:28, :28]
    total = image.sum()
    centre_r, centre_c = (rows * image).sum() / total, (cols * image).sum() / total
    var_r = ((rows - centre_r) ** 2 * image).sum() / total
    var_c = ((cols - centre_c) ** 2 * image).sum() / total
    cov = ((rows - centre_r) * (cols - centre_c) * image).sum() / total
    return centre_r, centre_c, cov / var_r, var_r, var_c - cov * cov / var_r


def _sample(image: np.ndarray, centre: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Output pixel o samples the input at centre + affine @ (o - middle), with scipy."""
    from scipy.ndimage import affine_transform

    offset = centre - affine @ np.array([14.0, 14.0])
    # grid-constant: a sample near the edge is interpolated with blank ink beyond it (scipy's
    # "constant" would blank the whole sample instead).
    return affine_transform(image.astype(np.float64), affine, offset=offset, order=1,
                            mode="grid-constant", cval=0.0)


def _reference_deskew(image: np.ndarray) -> np.ndarray:
    """The textbook deskew with scipy, kept here as the oracle for the compiled one."""
    centre_r, centre_c, shear, _, _ = _shape_of(image)
    return _sample(image, np.array([centre_r, centre_c]), np.array([[1, 0], [shear, 1]]))


def _reference_moments(image: np.ndarray) -> np.ndarray:
    """Liu et al.'s moment normalisation with aspect-ratio adaptation, written out with
    numpy and scipy from its definition: the oracle for the compiled stage."""
    centre_r, centre_c, shear, var_r, var_c = _shape_of(image)
    height, width = max(4 * np.sqrt(var_r), 2.0), max(4 * np.sqrt(var_c), 2.0)
    aspect = np.sqrt(np.sin(np.pi / 2 * min(height, width) / max(height, width)))
    target_h, target_w = ((MOMENT_EXTENT, MOMENT_EXTENT * aspect) if height >= width
                          else (MOMENT_EXTENT * aspect, MOMENT_EXTENT))
    scale_r, scale_c = target_h / height, target_w / width
    affine = np.array([[1 / scale_r, 0], [shear / scale_r, 1 / scale_c]])
    return _sample(image, np.array([centre_r, centre_c]), affine)


def _ring(radius: float, thickness: float = 1.5) -> np.ndarray:
    """A "0": an ellipse twice as tall as wide, about (13.5, 13.5)."""
    rows, cols = np.mgrid[:28, :28]
    distance = np.hypot((rows - 13.5) / (2 * radius), (cols - 13.5) / radius) * radius
    return np.clip(255 * (thickness - np.abs(distance - radius)), 0, 255).astype(np.uint8)


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


@pytest.mark.parametrize(("stage", "reference"), [(FeatureStage.DESKEW, _reference_deskew),
                                                  (FeatureStage.MOMENTS, _reference_moments)])
def test_stage_matches_its_scipy_reference(stage, reference):
    # Strokes, rings, and blotches of random ink anywhere in the frame (so digits
    # off-centre, where the transform samples past the edges).
    blotches = np.random.default_rng(0).integers(0, 256, (20, 28, 28)).astype(np.uint8)
    blotches[np.random.default_rng(1).random((20, 28, 28)) < 0.8] = 0
    images = np.concatenate([np.stack([_slanted_stroke(0), _slanted_stroke(3), _ring(4),
                                       _ring(6)]), blotches])
    features = apply_feature_stage(stage, images)
    for image, row in zip(images, features, strict=True):
        assert np.abs(row - reference(image).ravel()).max() < 1e-3


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


def test_moments_gives_a_digit_one_size_whatever_size_it_was_written():
    small, large = _ring(3), _ring(6)  # 13 and 25 rows tall
    sizes = {stage: [apply_feature_stage(stage, image[None]).reshape(28, 28)
                     for image in (small, large)] for stage in ("deskew", "moments")}

    def ink_height(img):
        return int(np.ptp(np.flatnonzero(img.sum(axis=1) > 0.5 * 255)))

    assert ink_height(sizes["deskew"][1]) - ink_height(sizes["deskew"][0]) >= 10
    # Scaled to the same extent. Not to the pixel: both rings have the same pen, which
    # spreads the small ring's ink further for its size, so it comes out a little smaller.
    assert abs(ink_height(sizes["moments"][1]) - ink_height(sizes["moments"][0])) <= 2


def test_moments_widens_a_thin_digit_part_of_the_way():
    one = np.zeros((28, 28), dtype=np.uint8)
    one[4:24, 13:15] = 255  # a "1": 20 rows tall, 2 columns wide
    normalised = apply_feature_stage("moments", one[None]).reshape(28, 28)
    columns = np.flatnonzero(normalised.sum(axis=0) > 0.5 * 255)
    rows = np.flatnonzero(normalised.sum(axis=1) > 0.5 * 255)
    # Four standard deviations of a 20-row bar span 23.1 rows, scaled to MOMENT_EXTENT (22);
    # of its 2 columns, 2.0, scaled to 22 x sqrt(sin(pi/2 x 2.0/23.1)) = 8.1: the bar is
    # widened four times, and stays about twice as tall as wide rather than made square.
    assert 18 <= np.ptp(rows) <= 21 and 8 <= np.ptp(columns) <= 12


@pytest.mark.parametrize("stage", list(FeatureStage))
def test_blank_image_stays_blank(stage):
    assert not apply_feature_stage(stage, np.zeros((1, 784), np.uint8)).any()


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="expected N x 784"):
        apply_feature_stage("raw", np.zeros((2, 100), np.uint8))


@pytest.mark.parametrize("stage", [FeatureStage.DESKEW, FeatureStage.MOMENTS])
def test_a_large_matrix_split_across_threads_is_transformed_row_for_row(monkeypatch, stage):
    import mlpaint.model.features as features_module

    images = np.random.default_rng(2).integers(0, 256, (300, 28, 28)).astype(np.uint8)
    images[np.random.default_rng(3).random(images.shape) < 0.8] = 0
    whole = apply_feature_stage(stage, images)  # 300 rows: one thread
    monkeypatch.setattr(features_module, "_ROWS_PER_THREAD", 64)
    monkeypatch.setattr(features_module.os, "cpu_count", lambda: 3)  # blocks of 100 rows
    split = apply_feature_stage(stage, images)
    assert np.array_equal(split, whole)
    assert np.array_equal(split[150], apply_feature_stage(stage, images[150:151])[0])
