"""Exact path-dependent TreeSHAP for LightGBM models, computed leaf by leaf in compiled code.

The contributions are those of LightGBM's `pred_contrib` and of shap.TreeExplainer (Lundberg
et al., 2020, Algorithm 2); the tests check they agree to 1e-9. What differs is how they are
computed. For a leaf with value v reached by a path whose distinct features F have "zero
fractions" z_j (the share of training rows that follow the path's splits on feature j: the
product of their cover ratios) and "one fractions" o_j (1 if the explained row satisfies all
of the path's conditions on j, else 0), feature i receives

    v (o_i - z_i) sum_{S subset of F minus i} |S|! (|F| - |S| - 1)! / |F|!
                  prod_{j in S} o_j prod_{j not in S, j != i} z_j.

Because every o_j is 0 or 1, only subsets of A = {j : o_j = 1} survive, and with
B = F minus A and Z_B the product of z over B:

- every feature of B receives the same amount, -v Z_B G(A), where
  G(A) = sum_s w(s) e_{|A| - s}(z_A), e_k the elementary symmetric polynomials of the z's;
- a feature i of A receives v (1 - z_i) Z_B G(A minus i), where the polynomials of A minus i
  follow from those of A by one deflation each.

So a leaf costs O(|A|^2 + |F|) rather than the O(|F|^2) of unwinding every feature from the
extended path. (Unlike the recursive algorithm, a condition shared by several leaves' paths
is tested once per path.) The paths are flattened once, when the explainer is built. The
expected value (the bias) is the cover-weighted mean of the leaf values, as in TreeSHAP.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import factorial

import numpy as np
from numba import njit, prange

SUPPORTED_DECISION = "<="


@dataclass(frozen=True)
class FlatPaths:
    """Every root-to-leaf path of a model's trees, grouped by output class."""

    class_starts: np.ndarray  # (classes + 1,) path index where each class's paths begin
    path_starts: np.ndarray  # (paths + 1,) element index where each path's features begin
    path_value: np.ndarray  # (paths,) leaf value (divided by the number of boosters)
    feature: np.ndarray  # (elements,) int32: a distinct feature of the path
    lower: np.ndarray  # (elements,) the path's conditions on it: lower < x <= upper
    upper: np.ndarray
    zero_fraction: np.ndarray  # (elements,) product of the cover ratios of its splits
    bias: np.ndarray  # (classes,) expected value of each class's score
    weights: np.ndarray  # (max_depth + 1, max_depth + 1): w[d, s] = s! (d - s - 1)! / d!

    @property
    def n_classes(self) -> int:
        return len(self.class_starts) - 1


def _walk(node: dict, conditions: dict[int, list[float]], scale: float,
          paths: list[tuple[float, dict[int, list[float]]]]) -> None:
    """Collect (leaf value, {feature: [lower, upper, zero fraction]}) for every leaf."""
    if "leaf_value" in node:
        paths.append((node["leaf_value"] * scale, conditions))
        return
    if node.get("decision_type") != SUPPORTED_DECISION:
        raise ValueError(f"unsupported split {node.get('decision_type')!r}: only numerical "
                         f"'{SUPPORTED_DECISION}' splits are explained here")
    feature = int(node["split_feature"])
    threshold = float(node["threshold"])
    count = float(node["internal_count"])
    for child, go_left in ((node["left_child"], True), (node["right_child"], False)):
        child_count = float(child.get("internal_count", child.get("leaf_count", 0)))
        lower, upper, zero = conditions.get(feature, [-np.inf, np.inf, 1.0])
        if go_left:
            upper = min(upper, threshold)
        else:
            lower = max(lower, threshold)
        ratio = child_count / count if count > 0 else 0.0
        _walk(child, {**conditions, feature: [lower, upper, zero * ratio]}, scale, paths)


def flatten(boosters: list, n_classes: int, *, dumps: list[list[dict]] | None = None
            ) -> FlatPaths:
    """The paths of LightGBM boosters (in each, tree t belongs to class t % n_classes). With
    several boosters (a bagged model) every leaf value is divided by their number, so the
    contributions are the mean of theirs, as the model's score is the mean of their scores.
    `dumps`: the boosters' `treepredict.dump_trees`, when already at hand."""
    from mlpaint.model.treepredict import dump_trees

    scale = 1.0 / len(boosters)
    per_class: list[list[tuple[float, dict[int, list[float]]]]] = [[] for _ in range(n_classes)]
    bias = np.zeros(n_classes)
    for tree_info in dumps if dumps is not None else dump_trees(boosters):
        for index, tree in enumerate(tree_info):
            root = tree["tree_structure"]
            cls = index % n_classes
            if "leaf_value" in root:  # a single-leaf tree: a constant, all bias
                bias[cls] += root["leaf_value"] * scale
                continue
            paths: list[tuple[float, dict[int, list[float]]]] = []
            _walk(root, {}, scale, paths)
            for value, conditions in paths:
                reach = np.prod([zero for _, _, zero in conditions.values()])
                bias[cls] += value * reach
            per_class[cls].extend(paths)
    return _pack(per_class, bias)


def _pack(per_class: list[list[tuple[float, dict[int, list[float]]]]],
          bias: np.ndarray) -> FlatPaths:
    ordered = [path for paths in per_class for path in paths]
    class_starts = np.cumsum([0] + [len(paths) for paths in per_class])
    lengths = [len(conditions) for _, conditions in ordered]
    path_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    features, lower, upper, zero = [], [], [], []
    for _, conditions in ordered:
        for feature, (low, high, fraction) in conditions.items():
            features.append(feature)
            lower.append(low)
            upper.append(high)
            zero.append(fraction)
    depth = max(lengths, default=0)
    weights = np.zeros((depth + 1, depth + 1))
    for d in range(1, depth + 1):
        for s in range(d):
            weights[d, s] = factorial(s) * factorial(d - s - 1) / factorial(d)
    return FlatPaths(
        class_starts=class_starts.astype(np.int64), path_starts=path_starts,
        path_value=np.array([value for value, _ in ordered], dtype=np.float64),
        feature=np.array(features, dtype=np.int32), lower=np.array(lower, dtype=np.float64),
        upper=np.array(upper, dtype=np.float64), zero_fraction=np.array(zero, dtype=np.float64),
        bias=bias, weights=weights)


@njit(cache=True, nogil=True)
def _explain_row(x, classes, class_starts, path_starts, path_value, feature, lower, upper,
                 zero_fraction, bias, weights, out):
    n_features = x.shape[0]
    depth = weights.shape[0]
    a_z = np.empty(depth)
    a_feature = np.empty(depth, dtype=np.int32)
    b_feature = np.empty(depth, dtype=np.int32)
    e = np.empty(depth + 1)
    deflated = np.empty(depth + 1)
    for slot in range(classes.shape[0]):
        cls = classes[slot]
        target = out[slot]
        target[n_features] = bias[cls]
        for p in range(class_starts[cls], class_starts[cls + 1]):
            start, stop = path_starts[p], path_starts[p + 1]
            d = stop - start
            n_a = 0
            n_b = 0
            z_b = 1.0
            # Branch-free: whether a row meets a path's conditions is a coin toss to the
            # CPU's branch predictor, and mispredictions cost more than the writes.
            for k in range(start, stop):
                f = feature[k]
                value = x[f]
                ok = (lower[k] < value) & (value <= upper[k])
                z = zero_fraction[k]
                a_z[n_a] = z
                a_feature[n_a] = f
                b_feature[n_b] = f
                n_a += ok
                n_b += 1 - ok
                z_b *= 1.0 if ok else z
            v = path_value[p]
            w = weights[d]
            # e_0..e_{n_a}: elementary symmetric polynomials of the z's of A.
            e[0] = 1.0
            for j in range(1, n_a + 1):
                e[j] = 0.0
            for j in range(n_a):
                z = a_z[j]
                for k in range(j + 1, 0, -1):
                    e[k] += z * e[k - 1]
            if n_b:  # the features the row fails: one shared amount each
                g = 0.0
                for s in range(n_a + 1):
                    g += w[s] * e[n_a - s]
                shared = -v * z_b * g
                for k in range(n_b):
                    target[b_feature[k]] += shared
            for i in range(n_a):
                z = a_z[i]
                # Deflate: the polynomials of A without i, e'_k = e_k - z e'_{k-1}.
                deflated[0] = 1.0
                for k in range(1, n_a):
                    deflated[k] = e[k] - z * deflated[k - 1]
                g = 0.0
                for s in range(n_a):
                    g += w[s] * deflated[n_a - 1 - s]
                target[a_feature[i]] += v * (1.0 - z) * z_b * g


# Two functions, not one function compiled twice: numba's on-disk cache names an entry after
# the Python function, without the `parallel` flag. Compiled from one function, whichever
# variant ran first on a machine was cached and then loaded for both. After `make run`
# published (parallel, all cores), the server's one-row calls ran the parallel kernel: each
# request woke a thread per core, and with two server processes explanations took three
# times as long (bench/serve.py).
@njit(cache=True, nogil=True)
def _explain_rows_serial(x, classes, class_starts, path_starts, path_value, feature, lower,
                         upper, zero_fraction, bias, weights, out):
    """One row after another on the calling thread (serving: one core per request)."""
    for row in range(x.shape[0]):
        _explain_row(x[row], classes, class_starts, path_starts, path_value, feature, lower,
                     upper, zero_fraction, bias, weights, out[row])


@njit(cache=True, nogil=True, parallel=True)
def _explain_rows_parallel(x, classes, class_starts, path_starts, path_value, feature, lower,
                           upper, zero_fraction, bias, weights, out):
    """The rows spread over every core (publishing a whole test set)."""
    for row in prange(x.shape[0]):
        _explain_row(x[row], classes, class_starts, path_starts, path_value, feature, lower,
                     upper, zero_fraction, bias, weights, out[row])


def explain(paths: FlatPaths, features: np.ndarray, classes: list[int] | np.ndarray, *,
            parallel: bool = False) -> np.ndarray:
    """(rows, len(classes), n_features + 1) float64: per asked class, each feature's exact
    contribution, then the bias; they add up to the class's raw score. `parallel` spreads
    the rows over every core; otherwise they are explained on the calling thread."""
    x = np.ascontiguousarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    wanted = np.asarray(classes, dtype=np.int64)
    if wanted.size and (wanted.min() < 0 or wanted.max() >= paths.n_classes):
        raise ValueError(f"classes must lie in 0..{paths.n_classes - 1}, got {classes}")
    out = np.zeros((x.shape[0], len(wanted), x.shape[1] + 1))
    kernel = _explain_rows_parallel if parallel else _explain_rows_serial
    kernel(
        x, wanted, paths.class_starts, paths.path_starts, paths.path_value, paths.feature,
        paths.lower, paths.upper, paths.zero_fraction, paths.bias, paths.weights, out)
    return out
