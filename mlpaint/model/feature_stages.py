"""The names of the feature stages, apart from their kernels (mlpaint.model.features): what only
names a stage (the CLI's choices, the experiment spec, a fit's record) then does not import
numba and compile nothing, so `mlpaint --help` and a spec's validation start fast."""

from __future__ import annotations

from enum import StrEnum


class FeatureStage(StrEnum):
    RAW = "raw"
    DESKEW = "deskew"
    MOMENTS = "moments"
