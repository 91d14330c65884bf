"""mlpaint.treepredict against LightGBM's own raw scores: deep and shallow trees, ties on
thresholds, missing values both ways, single-leaf trees, bagged boosters, float32 input."""

import lightgbm as lgb
import numpy as np
import pytest

from mlpaint import treepredict


def _train(x, y, *, classes, rounds=15, **params):
    objective = {"objective": "multiclass", "num_class": classes} if classes > 2 else {
        "objective": "regression"}
    return lgb.train({**objective, "verbose": -1, "seed": 0, "deterministic": True,
                      "num_threads": 1, **params}, lgb.Dataset(x, y), num_boost_round=rounds)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 6))
    x[:, 5] = np.round(x[:, 5])  # many rows exactly on a threshold's neighbours
    y = ((x[:, 0] > 0) + (x[:, 1] * x[:, 2] > 0.2) + (np.sin(3 * x[:, 0]) > 0.5)).astype(int)
    return x, y


@pytest.mark.parametrize("params", [
    {"num_leaves": 31, "min_data_in_leaf": 5},
    {"num_leaves": 4, "min_data_in_leaf": 20},
    {"num_leaves": 63, "max_depth": 12, "min_data_in_leaf": 2, "feature_fraction": 0.5},
])
def test_matches_lightgbm_raw_scores(data, params):
    x, y = data
    booster = _train(x, y, classes=4, **params)
    trees = treepredict.compile_trees([booster], 4)
    ours = treepredict.raw_scores(trees, x)
    assert ours.shape == (len(x), 4)
    assert np.abs(ours - booster.predict(x, raw_score=True)).max() < 1e-9


def test_float32_rows_take_lightgbm_branches(data):
    x, y = data
    x32 = x.astype(np.float32)
    booster = _train(x32, y, classes=4, num_leaves=31)
    trees = treepredict.compile_trees([booster], 4)
    assert np.abs(treepredict.raw_scores(trees, x32) - booster.predict(x32, raw_score=True)
                  ).max() < 1e-9


def test_missing_values_go_where_lightgbm_sends_them(data):
    x, y = data
    with_gaps = x.copy()
    with_gaps[::7, 0] = np.nan  # seen in training: the splits learn a default side
    booster = _train(with_gaps, y, classes=4, num_leaves=15)
    probe = x[:200].copy()
    probe[::3, 0] = np.nan
    probe[::5, 1] = np.nan  # never missing in training: read as zero
    trees = treepredict.compile_trees([booster], 4)
    assert np.abs(treepredict.raw_scores(trees, probe) - booster.predict(probe, raw_score=True)
                  ).max() < 1e-9


def test_zero_as_missing_is_refused(data):
    x, y = data
    booster = _train(x, y, classes=4, num_leaves=7, zero_as_missing=True)
    with pytest.raises(ValueError, match="zero as missing"):
        treepredict.compile_trees([booster], 4)


def test_single_leaf_trees_are_constants(data):
    x, _ = data
    booster = _train(x, np.full(len(x), 2.5), classes=1, rounds=3)
    trees = treepredict.compile_trees([booster], 1)
    assert len(trees.root) == 0
    assert np.abs(treepredict.raw_scores(trees, x[:5])[:, 0]
                  - booster.predict(x[:5], raw_score=True)).max() < 1e-9


def test_bagged_boosters_score_as_their_mean(data):
    x, y = data
    members = [_train(x, y, classes=4, num_leaves=7, seed=s, bagging_fraction=0.7,
                      bagging_freq=1) for s in (1, 2, 3)]
    trees = treepredict.compile_trees(members, 4)
    mean = sum(b.predict(x, raw_score=True) for b in members) / 3
    assert np.abs(treepredict.raw_scores(trees, x) - mean).max() < 1e-9
