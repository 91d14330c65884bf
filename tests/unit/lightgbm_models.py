"""Small LightGBM models built to stress code that walks their trees (mlpaint.model.treeshap,
mlpaint.model.treepredict): few features split again and again along a path, deep and shallow
trees, ties on thresholds, several classes."""

import lightgbm as lgb
import numpy as np

# Deep with features repeated along paths; shallow; deep and narrow with half the features.
STRESS_PARAMS = [
    {"num_leaves": 31, "min_data_in_leaf": 5},
    {"num_leaves": 4, "min_data_in_leaf": 20},
    {"num_leaves": 63, "max_depth": 12, "min_data_in_leaf": 2, "feature_fraction": 0.5},
    # the champion's kind: one binary model per class, random thresholds, shallow trees
    {"objective": "multiclassova", "extra_trees": True, "num_leaves": 31, "max_depth": 5,
     "min_data_in_leaf": 5},
]


def stress_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """600 rows of 6 features, the last rounded (ties on thresholds); 4 classes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(600, 6))
    x[:, 5] = np.round(x[:, 5])
    y = ((x[:, 0] > 0) + (x[:, 1] * x[:, 2] > 0.2) + (np.sin(3 * x[:, 0]) > 0.5)).astype(int)
    return x, y


def train_booster(x, y, *, classes, rounds=15, **params):
    objective = {"objective": "multiclass", "num_class": classes} if classes > 2 else {
        "objective": "regression"}
    return lgb.train({**objective, "verbose": -1, "seed": 0, "deterministic": True,
                      "num_threads": 1, **params}, lgb.Dataset(x, y), num_boost_round=rounds)
