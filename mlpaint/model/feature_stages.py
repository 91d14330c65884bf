"""The names of the feature stages, apart from their kernels (mlpaint.model.features): what only
names a stage (the CLI's choices, the experiment spec, a fit's record) then does not import
numba and compile nothing, so `mlpaint --help` and a spec's validation start fast."""

from __future__ import annotations

from enum import StrEnum


class FeatureStage(StrEnum):
    RAW = "raw"
    DESKEW = "deskew"
    MOMENTS = "moments"


# Part of the key of every stored feature matrix (and of the augmented and feedback rows,
# which go through a stage too): a matrix computed by older stage code is not read back as
# if this code had made it. Bump it when any stage's output changes, even slightly.
# 2: deskew compiled with numba, its sums in float64 (values moved by up to 0.002 of 255).
# 3: deskew shares its moments and sampling with the `moments` stage (one value in 54.9
#    million of the MNIST digits moved by 2e-6).
FEATURE_CODE_VERSION = "3"
