"""mlpaint.model.treeshap against LightGBM's own pred_contrib and shap.TreeExplainer, on models
built to stress it: few features split again and again along a path (merged conditions),
deep trees, single-leaf trees, several classes."""

import os

import lightgbm as lgb
import numpy as np
import pytest

from mlpaint.model import treeshap
from tests.unit.lightgbm_models import STRESS_PARAMS, stress_data, train_booster


@pytest.fixture(scope="module")
def data():
    return stress_data(0)


def _reference(booster, x, classes):
    return booster.predict(x, pred_contrib=True).reshape(len(x), classes, -1)


@pytest.mark.parametrize("params", STRESS_PARAMS)
def test_multiclass_matches_pred_contrib(data, params):
    x, y = data
    booster = train_booster(x, y, classes=4, **params)
    paths = treeshap.flatten([booster], 4)
    ours = treeshap.explain(paths, x[:80], [0, 1, 2, 3])
    assert np.abs(ours - _reference(booster, x[:80], 4)).max() < 1e-9
    raw = booster.predict(x[:80], raw_score=True)
    assert np.abs(ours.sum(axis=2) - raw).max() < 1e-9  # additivity
    parallel = treeshap.explain(paths, x[:80], [0, 1, 2, 3], parallel=True)
    assert np.array_equal(parallel, ours)


def test_a_subset_of_classes_in_any_order(data):
    x, y = data
    booster = train_booster(x, y, classes=4, num_leaves=15)
    paths = treeshap.flatten([booster], 4)
    full = _reference(booster, x[:20], 4)
    assert np.abs(treeshap.explain(paths, x[:20], [3, 1]) - full[:, [3, 1]]).max() < 1e-9
    with pytest.raises(ValueError, match=r"classes must lie in 0\.\.3"):
        treeshap.explain(paths, x[:2], [4])


def test_single_leaf_trees_count_as_bias(data):
    x, _ = data
    y = np.full(len(x), 2.5)  # nothing to learn: every tree is a single leaf
    booster = train_booster(x, y, classes=1, rounds=3)
    paths = treeshap.flatten([booster], 1)
    assert len(paths.path_value) == 0
    ours = treeshap.explain(paths, x[:5], [0])
    assert np.abs(ours - _reference(booster, x[:5], 1)).max() < 1e-9


def test_bagged_members_explain_as_their_mean(data):
    x, y = data
    members = [train_booster(x, y, classes=4, num_leaves=7, seed=s, bagging_fraction=0.7,
                      bagging_freq=1) for s in (1, 2, 3)]
    merged = treeshap.flatten(members, 4)
    mean = sum(_reference(b, x[:30], 4) for b in members) / 3
    assert np.abs(treeshap.explain(merged, x[:30], list(range(4))) - mean).max() < 1e-9


def test_matches_shap_tree_explainer(data):
    import shap

    x, y = data
    booster = train_booster(x, y, classes=4, num_leaves=15)
    values = shap.TreeExplainer(booster).shap_values(x[:10])  # (rows, features, classes)
    values = np.asarray(values)
    ours = treeshap.explain(treeshap.flatten([booster], 4), x[:10], [0, 1, 2, 3])
    assert np.abs(ours[:, :, :-1] - values.transpose(0, 2, 1)).max() < 1e-6


def test_categorical_splits_are_refused():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, size=(300, 2)).astype(float)
    y = (x[:, 0] == 3).astype(float)
    booster = lgb.train({"objective": "regression", "verbose": -1, "min_data_in_leaf": 5,
                         "min_data_per_group": 5, "cat_smooth": 1},
                        lgb.Dataset(x, y, categorical_feature=[0]), num_boost_round=3)
    with pytest.raises(ValueError, match="only numerical"):
        treeshap.flatten([booster], 1)


_EXPLAIN_ONCE = """
import sys
import numpy as np
import numba.np.ufunc.parallel as threading_layer
from mlpaint.model import treeshap
paths = treeshap.FlatPaths(
    class_starts=np.array([0, 1]), path_starts=np.array([0, 1]), path_value=np.array([1.0]),
    feature=np.array([0], np.int32), lower=np.array([-np.inf]), upper=np.array([0.5]),
    zero_fraction=np.array([0.5]), bias=np.array([0.5]), weights=np.array([[0.0, 0.0], [1.0, 0.0]]))
treeshap.explain(paths, np.zeros((1, 1)), [0], parallel=sys.argv[1] == "parallel")
print(threading_layer._is_initialized)
"""


def test_serving_explains_on_its_own_thread_after_publishing_cached_the_parallel_kernel(
        tmp_path):
    """Publishing compiles the all-cores kernel and numba caches it on disk; a server started
    later on the same machine must still get the one-thread kernel, not load the cached
    parallel one (which woke a thread per core for every request: bench/serve.py)."""
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def started_threads(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", _EXPLAIN_ONCE, mode], env=env, check=True,
                              capture_output=True, text=True).stdout.strip()

    assert started_threads("parallel") == "True"  # publishing, cached first
    assert started_threads("serial") == "False"  # then serving
