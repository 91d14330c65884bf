"""mlpaint.model.treepredict against LightGBM's own raw scores: deep and shallow trees, ties on
thresholds, missing values both ways, single-leaf trees, bagged boosters, float32 input."""

import numpy as np
import pytest

from mlpaint.model import treepredict
from tests.unit.lightgbm_models import STRESS_PARAMS, stress_data, train_booster


@pytest.fixture(scope="module")
def data():
    return stress_data(1)


@pytest.mark.parametrize("params", STRESS_PARAMS)
def test_matches_lightgbm_raw_scores(data, params):
    x, y = data
    booster = train_booster(x, y, classes=4, **params)
    trees = treepredict.compile_trees([booster], 4)
    ours = treepredict.raw_scores(trees, x)
    assert ours.shape == (len(x), 4)
    assert np.abs(ours - booster.predict(x, raw_score=True)).max() < 1e-9


def test_float32_rows_take_lightgbm_branches(data):
    x, y = data
    x32 = x.astype(np.float32)
    booster = train_booster(x32, y, classes=4, num_leaves=31)
    trees = treepredict.compile_trees([booster], 4)
    assert np.abs(treepredict.raw_scores(trees, x32) - booster.predict(x32, raw_score=True)
                  ).max() < 1e-9


def test_missing_values_go_where_lightgbm_sends_them(data):
    x, y = data
    with_gaps = x.copy()
    with_gaps[::7, 0] = np.nan  # seen in training: the splits learn a default side
    booster = train_booster(with_gaps, y, classes=4, num_leaves=15)
    probe = x[:200].copy()
    probe[::3, 0] = np.nan
    probe[::5, 1] = np.nan  # never missing in training: read as zero
    trees = treepredict.compile_trees([booster], 4)
    assert np.abs(treepredict.raw_scores(trees, probe) - booster.predict(probe, raw_score=True)
                  ).max() < 1e-9


def test_zero_as_missing_is_refused(data):
    x, y = data
    booster = train_booster(x, y, classes=4, num_leaves=7, zero_as_missing=True)
    with pytest.raises(ValueError, match="zero as missing"):
        treepredict.compile_trees([booster], 4)


def test_single_leaf_trees_are_constants(data):
    x, _ = data
    booster = train_booster(x, np.full(len(x), 2.5), classes=1, rounds=3)
    trees = treepredict.compile_trees([booster], 1)
    assert len(trees.root) == 0
    assert np.abs(treepredict.raw_scores(trees, x[:5])[:, 0]
                  - booster.predict(x[:5], raw_score=True)).max() < 1e-9


def test_bagged_boosters_score_as_their_mean(data):
    x, y = data
    members = [train_booster(x, y, classes=4, num_leaves=7, seed=s, bagging_fraction=0.7,
                      bagging_freq=1) for s in (1, 2, 3)]
    trees = treepredict.compile_trees(members, 4)
    mean = sum(b.predict(x, raw_score=True) for b in members) / 3
    assert np.abs(treepredict.raw_scores(trees, x) - mean).max() < 1e-9


def test_one_dump_serves_both_compiled_structures(data):
    """Serving dumps a model's trees once for the scorer and the explainer alike."""
    from mlpaint.model import treeshap

    x, y = data
    booster = train_booster(x, y, classes=4, num_leaves=15)
    dumps = treepredict.dump_trees([booster])
    scores = treepredict.raw_scores(treepredict.compile_trees([booster], 4, dumps=dumps), x)
    assert np.array_equal(scores, treepredict.raw_scores(
        treepredict.compile_trees([booster], 4), x))
    contributions = treeshap.explain(treeshap.flatten([booster], 4, dumps=dumps), x[:20],
                                     [0, 1, 2, 3])
    assert np.abs(contributions.sum(axis=2) - scores[:20]).max() < 1e-9
