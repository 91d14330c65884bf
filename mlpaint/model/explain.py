"""Exact TreeSHAP explanations of a digit model, and what publishing precomputes from them.

Serving and publishing explain with `ClassExplainer` (mlpaint.model.treeshap: path-dependent
TreeSHAP computed leaf by leaf, only for the classes asked for). `contributions` is LightGBM's
own `pred_contrib`, the reference: publishing checks the stored gallery against it, so a
bundle never ships numbers LightGBM would not give. shap.TreeExplainer gives the same numbers
again (the tests compare all three). For a bagged model the contributions are the mean of
its boosters', matching its mean raw score, so additivity still holds exactly: bias + sum of
the 784 pixel contributions = the raw score of that class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlpaint.data.pins import IMAGE_SIDE, N_CLASSES, N_FEATURES
from mlpaint.training.algorithms import DigitModel

ADDITIVITY_TOLERANCE = 1e-4


class AdditivityError(AssertionError):
    """Stored contributions do not add up to the model's raw score."""


def contributions(model: DigitModel, features: np.ndarray, *, chunk_rows: int = 2048
                  ) -> np.ndarray:
    """(rows, 10, 785) float64: per class, 784 pixel contributions then the bias, from
    LightGBM's `pred_contrib` (the reference the fast path is checked against)."""
    features = np.asarray(features, dtype=np.float32)
    out = np.zeros((features.shape[0], N_CLASSES, N_FEATURES + 1), dtype=np.float64)
    for start in range(0, features.shape[0], chunk_rows):
        block = features[start:start + chunk_rows]
        for booster in model.boosters:
            out[start:start + len(block)] += booster.predict(block, pred_contrib=True).reshape(
                len(block), N_CLASSES, N_FEATURES + 1)
    out /= len(model.boosters)
    return out


class ClassExplainer:
    """Exact per-class contributions of a DigitModel, computing only the classes asked for,
    with mlpaint.model.treeshap (the same numbers as LightGBM's `pred_contrib`, computed leaf by
    leaf; bench/explain.py measures both beside shap.TreeExplainer)."""

    def __init__(self, model: DigitModel, *, parallel: bool = True, paths=None) -> None:
        self.model = model
        self.parallel = parallel  # False: every row on the calling thread (serving)
        self._paths = paths  # the model's flattened paths, if the caller already has them

    @property
    def paths(self):
        """The model's root-to-leaf paths (all its boosters'), flattened on first use."""
        if self._paths is None:
            from mlpaint.model import treeshap

            self._paths = treeshap.flatten(self.model.boosters, N_CLASSES)
        return self._paths

    def explain(self, features: np.ndarray, classes: list[int]) -> np.ndarray:
        """(rows, len(classes), 785): each asked class's 784 contributions, then its bias."""
        from mlpaint.model import treeshap

        return treeshap.explain(self.paths, features, classes, parallel=self.parallel)

    def explain_own_class(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(rows, 785): each row's contributions to the score of its own label."""
        out = np.zeros((features.shape[0], N_FEATURES + 1), dtype=np.float64)
        for digit in range(N_CLASSES):
            rows = np.flatnonzero(labels == digit)
            if rows.size:
                out[rows] = self.explain(features[rows], [digit])[:, 0]
        return out


class ReferenceMismatchError(AssertionError):
    """Contributions differ from LightGBM's own `pred_contrib`."""


def check_against_reference(model: DigitModel, features: np.ndarray, contrib: np.ndarray,
                            tolerance: float = 1e-6) -> float:
    """The largest difference between `contrib` (rows, 10, 785) and LightGBM's `pred_contrib`
    on the same rows; raises past the tolerance."""
    error = float(np.abs(contributions(model, features) - contrib).max()) if len(contrib) else 0.0
    if not error <= tolerance:
        raise ReferenceMismatchError(f"contributions differ from LightGBM's pred_contrib by "
                                     f"{error:.3g} (tolerance {tolerance:g})")
    return error


def check_additivity(contrib: np.ndarray, raw_scores: np.ndarray,
                     tolerance: float = ADDITIVITY_TOLERANCE) -> float:
    """The largest |bias + sum(contributions) - raw score|; raises past the tolerance."""
    error = float(np.abs(contrib.sum(axis=2, dtype=np.float64) - raw_scores).max())
    if not error <= tolerance:
        raise AdditivityError(f"bias + contributions differ from the raw score by {error:.3g} "
                              f"(tolerance {tolerance:g})")
    return error


@dataclass(frozen=True)
class DigitMaps:
    """Per digit d, over the test examples labelled d, the mean contribution of each pixel to
    the score of d, and the mean absolute contribution."""

    mean: np.ndarray  # (10, 784)
    mean_abs: np.ndarray  # (10, 784)


def digit_maps(own_class: np.ndarray, labels: np.ndarray) -> DigitMaps:
    """From each row's contributions to its own label (rows, 785)."""
    mean = np.zeros((N_CLASSES, N_FEATURES), dtype=np.float32)
    mean_abs = np.zeros((N_CLASSES, N_FEATURES), dtype=np.float32)
    for digit in range(N_CLASSES):
        rows = own_class[labels == digit, :N_FEATURES]
        if len(rows):
            mean[digit] = rows.mean(axis=0)
            mean_abs[digit] = np.abs(rows).mean(axis=0)
    return DigitMaps(mean, mean_abs)


def render_digit_maps(maps: np.ndarray, destination: Path, title: str, *,
                      signed: bool) -> Path:
    """Ten 28x28 maps; signed maps green where pixels raise the digit's score, red where they
    lower it, on a scale symmetric about zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    figure, axes = plt.subplots(2, 5, figsize=(10, 4.6))
    # A few pixels dominate; scaling to the 99.5th percentile keeps the rest visible.
    limit = float(np.percentile(np.abs(maps), 99.5)) or float(np.abs(maps).max()) or 1.0
    colours = (LinearSegmentedColormap.from_list("red-white-green",
                                                 ["#c62828", "#ffffff", "#2e7d32"])
               if signed else "magma")
    for digit, axis in enumerate(axes.flat):
        image = maps[digit].reshape(IMAGE_SIDE, IMAGE_SIDE)
        shown = axis.imshow(image, cmap=colours, vmin=-limit if signed else 0.0, vmax=limit)
        axis.set_title(str(digit))
        axis.set_xticks([])
        axis.set_yticks([])
    figure.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.8)
    figure.suptitle(title)
    destination.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(destination, dpi=80)
    plt.close(figure)
    return destination


def gallery_rows(labels: np.ndarray, row_hash: np.ndarray, per_digit: int,
                 modulus: int = 5) -> dict[int, np.ndarray]:
    """Per digit, `per_digit` test rows from the row-hash held-out subset
    (`row_hash % modulus == 0`), in row-hash order: deterministic, and spread over the set.
    Falls back to the other rows only when the subset holds too few of a digit."""
    held_out = row_hash % np.uint64(modulus) == 0
    chosen: dict[int, np.ndarray] = {}
    for digit in range(N_CLASSES):
        rows = np.flatnonzero(labels == digit)
        preferred = rows[held_out[rows]]
        rest = rows[~held_out[rows]]
        ordered = np.concatenate([preferred[np.argsort(row_hash[preferred], kind="stable")],
                                  rest[np.argsort(row_hash[rest], kind="stable")]])
        chosen[digit] = ordered[:per_digit]
    return chosen
