"""Raw scores of LightGBM boosters, walking their trees in compiled code.

Why: serving scores one drawing per request, and a LightGBM `predict` call has a cost of its
own beyond walking the trees (argument checks, a predictor object, buffers). For one row
that cost is most of the call, several times the walk itself, and under concurrent requests
it queues past the latency target (BENCHMARKS.md, "Serving", compares the two on the same
model and rows). The walk is a few tens of thousands of comparisons.

The trees are copied once into flat arrays (one node per split, children as indices, leaves
as negative indices into the leaf values). The decision rule is LightGBM's for numerical
splits: go left when x <= threshold; a missing value (NaN) goes where LightGBM sends it —
left when the split's missing type is NaN and its default is left, and as a zero when the
missing type is None (LightGBM reads NaN as 0 there). Models whose splits treat zero as
missing, or split on categories, are refused rather than scored differently. `ServedModel`
checks the result against LightGBM's own predict when it loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

SUPPORTED_DECISION = "<="
SUPPORTED_MISSING = ("None", "NaN")


@dataclass(frozen=True)
class FlatTrees:
    """Every split of a model's trees. Child index c >= 0 is a split, c < 0 the leaf ~c."""

    root: np.ndarray  # (trees,) int32: the tree's first split
    tree_class: np.ndarray  # (trees,) int32: the class whose score the tree adds to
    feature: np.ndarray  # (splits,) int32
    threshold: np.ndarray  # (splits,) float64
    nan_left: np.ndarray  # (splits,) bool: where a missing value goes
    left: np.ndarray  # (splits,) int32
    right: np.ndarray  # (splits,) int32
    leaf_value: np.ndarray  # (leaves,) float64, divided by the number of boosters
    bias: np.ndarray  # (classes,) the constant trees (a single leaf each), summed

    @property
    def n_classes(self) -> int:
        return len(self.bias)


class _Builder:
    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.feature: list[int] = []
        self.threshold: list[float] = []
        self.nan_left: list[bool] = []
        self.left: list[int] = []
        self.right: list[int] = []
        self.leaf_value: list[float] = []

    def add(self, node: dict) -> int:
        """Append a subtree; return its index (>= 0 a split, < 0 a leaf)."""
        if "leaf_value" in node:
            self.leaf_value.append(node["leaf_value"] * self.scale)
            return ~(len(self.leaf_value) - 1)
        if node.get("decision_type") != SUPPORTED_DECISION:
            raise ValueError(f"unsupported split {node.get('decision_type')!r}: only numerical "
                             f"'{SUPPORTED_DECISION}' splits are scored here")
        missing = node.get("missing_type", "None")
        if missing not in SUPPORTED_MISSING:
            raise ValueError(f"unsupported missing type {missing!r} (zero as missing): "
                             f"score this model with LightGBM")
        threshold = float(node["threshold"])
        index = len(self.feature)
        self.feature.append(int(node["split_feature"]))
        self.threshold.append(threshold)
        # Missing type None: LightGBM reads NaN as 0, which goes left when 0 <= threshold.
        self.nan_left.append(bool(node["default_left"]) if missing == "NaN" else threshold >= 0)
        self.left.append(0)
        self.right.append(0)
        self.left[index] = self.add(node["left_child"])
        self.right[index] = self.add(node["right_child"])
        return index


def dump_trees(boosters: list) -> list[list[dict]]:
    """Each booster's trees as LightGBM dumps them: seconds of work for a large model, so
    whoever builds both this module's and mlpaint.treeshap's structures dumps once."""
    return [booster.dump_model()["tree_info"] for booster in boosters]


def compile_trees(boosters: list, n_classes: int, *, dumps: list[list[dict]] | None = None
                  ) -> FlatTrees:
    """The trees of LightGBM boosters (in each, tree t adds to class t % n_classes). With
    several boosters every leaf value is divided by their number: the score is their mean.
    `dumps`: the boosters' `dump_trees`, when already at hand."""
    scale = 1.0 / len(boosters)
    builder = _Builder(scale)
    roots, classes = [], []
    bias = np.zeros(n_classes)
    for tree_info in dumps if dumps is not None else dump_trees(boosters):
        for index, tree in enumerate(tree_info):
            root = tree["tree_structure"]
            if "leaf_value" in root:  # a single-leaf tree adds a constant
                bias[index % n_classes] += root["leaf_value"] * scale
                continue
            roots.append(builder.add(root))
            classes.append(index % n_classes)
    return FlatTrees(
        root=np.array(roots, dtype=np.int32), tree_class=np.array(classes, dtype=np.int32),
        feature=np.array(builder.feature, dtype=np.int32),
        threshold=np.array(builder.threshold, dtype=np.float64),
        nan_left=np.array(builder.nan_left, dtype=np.bool_),
        left=np.array(builder.left, dtype=np.int32), right=np.array(builder.right, dtype=np.int32),
        leaf_value=np.array(builder.leaf_value, dtype=np.float64), bias=bias)


@njit(cache=True, nogil=True)
def _raw_scores(x, root, tree_class, feature, threshold, nan_left, left, right, leaf_value,
                bias, out):
    for row in range(x.shape[0]):
        values = x[row]
        scores = out[row]
        scores[:] = bias
        for t in range(root.shape[0]):
            node = root[t]
            while node >= 0:
                value = values[feature[node]]
                go_left = nan_left[node] if np.isnan(value) else value <= threshold[node]
                node = left[node] if go_left else right[node]
            scores[tree_class[t]] += leaf_value[~node]


def raw_scores(trees: FlatTrees, features: np.ndarray) -> np.ndarray:
    """(rows, classes) float64: the model's raw scores, on the calling thread."""
    # LightGBM compares float32 inputs as doubles; so do we.
    x = np.ascontiguousarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    out = np.empty((x.shape[0], trees.n_classes))
    _raw_scores(x, trees.root, trees.tree_class, trees.feature, trees.threshold, trees.nan_left,
                trees.left, trees.right, trees.leaf_value, trees.bias, out)
    return out
