import numpy as np
import pytest

from mlpaint.training.algorithms import (
    BaggedBoostingConfig,
    DigitModel,
    GbdtConfig,
    load_algorithms,
    softmax,
    train_model,
)


@pytest.fixture(scope="module")
def separable():
    """Ten well-separated blobs in 20 dimensions: any working learner gets them right."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, size=(10, 20))
    labels = np.repeat(np.arange(10), 60)
    features = (centres[labels] + rng.normal(0, 0.5, size=(600, 20))).astype(np.float32)
    return features, labels


def test_packaged_algorithms():
    algorithms = load_algorithms()
    assert isinstance(algorithms["lgbm"], GbdtConfig)
    bbdt = algorithms["bbdt_d5"]
    assert isinstance(bbdt, BaggedBoostingConfig)
    assert (bbdt.bags, bbdt.min_rounds, bbdt.max_rounds) == (5, 5, 30)
    assert bbdt.params["max_depth"] == 7 and bbdt.params["feature_fraction"] == 0.3


def test_gbdt_learns_and_round_trips(separable, tmp_path):
    features, labels = separable
    config = GbdtConfig(rounds=15, params={"num_leaves": 7, "min_data_in_leaf": 5})
    model = train_model("lgbm", config, features, labels, seed=0, num_threads=1)
    probabilities = model.predict_proba(features)
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    assert (probabilities.argmax(axis=1) == labels).mean() > 0.95
    loaded = DigitModel.load(model.save(tmp_path / "m"))
    assert np.allclose(loaded.raw_scores(features), model.raw_scores(features))
    # one booster: our softmax of raw scores is LightGBM's own probability
    assert np.allclose(probabilities, model.boosters[0].predict(features), atol=1e-9)


def test_bagged_boosting_averages_raw_scores(separable):
    features, labels = separable
    config = BaggedBoostingConfig(bags=3, bag_train_fraction=0.66, min_rounds=2, max_rounds=8,
                                  params={"max_depth": 3, "num_leaves": 7,
                                          "feature_fraction": 0.3, "min_data_in_leaf": 5})
    model = train_model("bbdt", config, features, labels, seed=1, num_threads=1)
    assert len(model.boosters) == 3
    assert all(2 <= r <= 8 for r in model.rounds)
    assert [b.current_iteration() for b in model.boosters] == model.rounds
    mean_raw = np.mean([b.predict(features, raw_score=True) for b in model.boosters], axis=0)
    assert np.allclose(model.raw_scores(features), mean_raw)
    assert np.allclose(model.predict_proba(features), softmax(mean_raw))
    assert (model.predict_proba(features).argmax(axis=1) == labels).mean() > 0.9
