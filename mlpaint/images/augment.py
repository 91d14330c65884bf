"""Augmentation: more training digits that look like what people draw.

Plain, typed functions on uint8 image stacks (N x 28 x 28 or N x 784); the Prefect task in
`tasks/training.py` only adds caching and logging. Every transform draws its parameters from
one `numpy.random.Generator`, so the same images, spec and seed give the same copies.

Each copy of a row goes through, in this order, each transform whose probability comes up:

- **elastic** distortion (Simard, Steinkraus and Platt, 2003): a random displacement field
  smoothed with a Gaussian of `sigma` pixels and scaled by `alpha`;
- **affine**: shift, rotation, scale and shear about the frame's centre (one resampling
  together with the elastic field);
- **stroke** thickness: grey-level dilation (thicker) or erosion (thinner), blended with the
  original by a random strength;
- **as drawn**: the digit re-rendered the way the drawing page holds it — thinned to its
  centre line, redrawn with a uniform round pen whose width is a random fraction of the
  digit's height, at three times the resolution — and brought back to 28x28 by the app's own
  drawing preprocessing (`mlpaint.images.preprocess.to_mnist`), so training sees what serving sees.
  Where on the canvas it was drawn does not matter: that function crops to the ink first.

Geometry and stroke work on the whole stack at once; "as drawn" thins, measures and
re-renders one digit at a time (skeletonisation, distance transform and the app's
preprocessing are per-image operations), the slowest part of augmenting.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlpaint.data.pins import IMAGE_SIDE, N_FEATURES, as_images

# Bumped whenever a transform changes what it produces, so cached augmented sets are rebuilt.
AUGMENT_CODE_VERSION = "1"

_CENTRE = (IMAGE_SIDE - 1) / 2.0
_AS_DRAWN_UPSCALE = 3  # render resolution: 84x84, enough for a smooth pen edge
_INK_LEVEL = 0.4  # of full ink: where the centre line of a grey MNIST stroke is traced
_CHUNK_ROWS = 4096  # bounds the geometric transform's temporaries


class _Transform(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    probability: float = Field(0.5, ge=0.0, le=1.0,
                               description="chance that a copy gets this transform; 0 turns it "
                                           "off")


class AffineAugment(_Transform):
    probability: float = Field(1.0, ge=0.0, le=1.0)
    max_shift_px: float = Field(2.0, ge=0.0, le=6.0, description="each axis, uniform ±")
    max_rotation_deg: float = Field(15.0, ge=0.0, le=45.0, description="uniform ±")
    scale_min: float = Field(0.85, gt=0.3, le=1.0)
    scale_max: float = Field(1.15, ge=1.0, le=1.6)
    max_shear_deg: float = Field(10.0, ge=0.0, le=30.0, description="uniform ±, horizontal")


class StrokeAugment(_Transform):
    """Half the chosen copies get thicker strokes (grey dilation), half thinner (erosion);
    the result is blended with the original by a strength drawn from [min, max]."""

    min_strength: float = Field(0.5, ge=0.0, le=1.0)
    max_strength: float = Field(1.0, ge=0.0, le=1.0)


class ElasticAugment(_Transform):
    probability: float = Field(0.3, ge=0.0, le=1.0)
    alpha: float = Field(34.0, ge=0.0, le=60.0, description="displacement scale, pixels")
    sigma: float = Field(4.0, ge=1.0, le=10.0, description="smoothing of the field, pixels")


class AsDrawnAugment(_Transform):
    min_stroke: float = Field(0.06, gt=0.0, le=0.5,
                              description="narrowest pen, as a fraction of the digit's height")
    max_stroke: float = Field(0.22, gt=0.0, le=0.5,
                              description="widest pen, as a fraction of the digit's height")


class AugmentSpec(BaseModel):
    """How many augmented copies each training row gets, and how they are made. Copies are
    made only of the rows a model trains on; `copies: 0` turns augmentation off."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # One copy by default, as the packaged default spec trains: run forms fill a nested
    # section's empty fields from the section's own defaults.
    copies: int = Field(1, ge=0, le=16, description="augmented copies per training row")
    elastic: ElasticAugment = Field(default_factory=ElasticAugment)
    affine: AffineAugment = Field(default_factory=AffineAugment)
    stroke: StrokeAugment = Field(default_factory=StrokeAugment)
    as_drawn: AsDrawnAugment = Field(default_factory=AsDrawnAugment)

    @model_validator(mode="after")
    def _ranges_ordered(self) -> AugmentSpec:
        for name, low, high in (
                ("affine.scale", self.affine.scale_min, self.affine.scale_max),
                ("stroke.strength", self.stroke.min_strength, self.stroke.max_strength),
                ("as_drawn.stroke", self.as_drawn.min_stroke, self.as_drawn.max_stroke)):
            if low > high:
                raise ValueError(f"{name}: the minimum {low} is above the maximum {high}")
        return self


def _as_images(pixels: np.ndarray) -> np.ndarray:
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    return as_images(array)


def affine_matrices(rng: np.random.Generator, n: int, spec: AffineAugment) -> np.ndarray:
    """(n, 2, 2) forward maps in (row, col) coordinates: rotation · shear · scale."""
    theta = np.deg2rad(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg, n))
    shear = np.tan(np.deg2rad(rng.uniform(-spec.max_shear_deg, spec.max_shear_deg, n)))
    scale = rng.uniform(spec.scale_min, spec.scale_max, n)
    cos, sin = np.cos(theta), np.sin(theta)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shearing = np.zeros((n, 2, 2))
    shearing[:, 0, 0] = shearing[:, 1, 1] = 1.0
    shearing[:, 1, 0] = shear  # columns move in proportion to the row: a slant
    return rotation @ shearing * scale[:, None, None]


def elastic_fields(rng: np.random.Generator, n: int, spec: ElasticAugment) -> np.ndarray:
    """(n, 2, 28, 28) displacements: uniform noise smoothed per image, scaled by alpha."""
    from scipy.ndimage import gaussian_filter

    noise = rng.uniform(-1.0, 1.0, (n, 2, IMAGE_SIDE, IMAGE_SIDE))
    return gaussian_filter(noise, sigma=(0, 0, spec.sigma, spec.sigma)) \
        * spec.alpha


def warp(images: np.ndarray, matrices: np.ndarray, shifts: np.ndarray,
         fields: np.ndarray | None = None) -> np.ndarray:
    """Resample each image through its forward affine map (about the frame's centre, then
    shifted) plus an optional displacement field; bilinear, blank outside the frame."""
    from scipy.ndimage import map_coordinates

    n = images.shape[0]
    grid = np.stack(np.meshgrid(np.arange(IMAGE_SIDE), np.arange(IMAGE_SIDE), indexing="ij"))
    offsets = grid.reshape(2, -1).astype(np.float64) - _CENTRE  # (2, 784)
    inverse = np.linalg.inv(matrices)  # output pixel -> where it comes from
    source = inverse @ (offsets[None] - shifts[:, :, None]) + _CENTRE  # (n, 2, 784)
    source = source.reshape(n, 2, IMAGE_SIDE, IMAGE_SIDE)
    if fields is not None:
        source = source + fields
    batch = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None, None], source[:, 0].shape)
    coordinates = np.stack([batch, source[:, 0], source[:, 1]])
    warped = map_coordinates(images.astype(np.float32), coordinates, order=1, mode="constant",
                             cval=0.0, prefilter=False)
    return np.clip(np.rint(warped), 0, 255).astype(np.uint8)


def change_stroke(images: np.ndarray, thicker: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """Grey dilation where `thicker`, erosion elsewhere, blended with the original."""
    from scipy.ndimage import grey_dilation, grey_erosion

    cross = np.zeros((1, 3, 3), dtype=bool)
    cross[0, 1, :] = cross[0, :, 1] = True
    values = images.astype(np.float32)
    changed = np.where(thicker[:, None, None], grey_dilation(values, footprint=cross),
                       grey_erosion(values, footprint=cross))
    mixed = values + strength[:, None, None].astype(np.float32) * (changed - values)
    # Erosion also dims a thin stroke's centre; restoring each digit's peak keeps "thinner"
    # from turning into "fainter", which no pen on the page produces.
    peak_before = values.max(axis=(1, 2))
    peak_after = mixed.max(axis=(1, 2))
    gain = np.where(peak_after > 0, peak_before / np.where(peak_after > 0, peak_after, 1), 1)
    mixed *= gain[:, None, None]
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def render_as_drawn(image: np.ndarray, stroke_fraction: float) -> np.ndarray:
    """One digit redrawn with a uniform round pen of `stroke_fraction` x its height, then
    brought back through the app's drawing preprocessing. A digit with no stroke to trace
    comes back unchanged."""
    from PIL import Image
    from scipy.ndimage import distance_transform_edt
    from skimage.morphology import skeletonize

    from mlpaint.images.preprocess import to_mnist

    side = IMAGE_SIDE * _AS_DRAWN_UPSCALE
    large = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR),
                       dtype=np.float32) / 255.0
    centre_line = skeletonize(large > _INK_LEVEL)
    rows = np.flatnonzero(centre_line.any(axis=1))
    if rows.size == 0:
        return image.copy()
    height = max(rows[-1] - rows[0] + 1, np.ptp(np.flatnonzero(centre_line.any(axis=0))) + 1)
    radius = stroke_fraction * height / 2.0
    distance = distance_transform_edt(~centre_line)
    ink = np.clip(radius + 0.5 - distance, 0.0, 1.0)  # a pen edge one pixel wide
    return to_mnist(ink)


def augment(pixels: np.ndarray, spec: AugmentSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`spec.copies` augmented copies of every row: (copies x N, 784) uint8 pixels, and for
    each the position of the row it was made from. Copy c of every row comes first for c = 0,
    then c = 1, and so on."""
    images = _as_images(pixels)
    n = images.shape[0]
    out = np.empty((spec.copies * n, N_FEATURES), dtype=np.uint8)
    for copy in range(spec.copies):
        rng = np.random.default_rng([seed, copy])
        for start in range(0, n, _CHUNK_ROWS):
            chunk = images[start:start + _CHUNK_ROWS]
            row0 = copy * n + start
            out[row0:row0 + len(chunk)] = augment_images(chunk, spec, rng).reshape(-1, N_FEATURES)
    return out, np.tile(np.arange(n, dtype=np.int64), spec.copies)


def augment_images(images: np.ndarray, spec: AugmentSpec,
                   rng: np.random.Generator) -> np.ndarray:
    """One augmented copy of each image (N x 28 x 28 uint8 in and out)."""
    images = _as_images(images)
    n = images.shape[0]
    # Every draw happens whatever the probabilities, so changing one transform's probability
    # leaves the others' parameters as they were.
    use_elastic = rng.random(n) < spec.elastic.probability
    use_affine = rng.random(n) < spec.affine.probability
    use_stroke = rng.random(n) < spec.stroke.probability
    use_as_drawn = rng.random(n) < spec.as_drawn.probability
    fields = elastic_fields(rng, n, spec.elastic)
    matrices = affine_matrices(rng, n, spec.affine)
    shifts = rng.uniform(-spec.affine.max_shift_px, spec.affine.max_shift_px, (n, 2))
    thicker = rng.random(n) < 0.5
    strength = rng.uniform(spec.stroke.min_strength, spec.stroke.max_strength, n)
    pen = rng.uniform(spec.as_drawn.min_stroke, spec.as_drawn.max_stroke, n)

    result = images.copy()
    moved = use_elastic | use_affine
    if moved.any():
        matrices[~use_affine] = np.eye(2)
        shifts[~use_affine] = 0.0
        fields[~use_elastic] = 0.0
        result[moved] = warp(images[moved], matrices[moved], shifts[moved], fields[moved])
    if use_stroke.any():
        result[use_stroke] = change_stroke(result[use_stroke], thicker[use_stroke],
                                           strength[use_stroke])
    for row in np.flatnonzero(use_as_drawn):
        result[row] = render_as_drawn(result[row], float(pen[row]))
    return result


def fold_training_rows(train_rows: np.ndarray, copy_source: np.ndarray) -> np.ndarray:
    """Positions of the augmented copies a fold may train on: those made from one of its
    training rows. A copy of a test row never trains the fold that tests on that row."""
    return np.flatnonzero(np.isin(copy_source, train_rows))
