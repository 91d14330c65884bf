import numpy as np
import pytest

from mlpaint.training.algorithms import (
    BaggedBoostingConfig,
    DigitModel,
    GbdtConfig,
    ModelFormatError,
    ScoreLink,
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
    model = train_model("lgbm", config, features, labels, feature_stage="raw", seed=0,
                        num_threads=1)
    probabilities = model.predict_proba(features)
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    assert (probabilities.argmax(axis=1) == labels).mean() > 0.95
    loaded = DigitModel.load(model.save(tmp_path / "m"))
    assert np.allclose(loaded.raw_scores(features), model.raw_scores(features))
    # one booster: our softmax of raw scores is LightGBM's own probability
    assert np.allclose(probabilities, model.boosters[0].predict(features), atol=1e-9)


def test_one_vs_rest_models_read_their_scores_as_sigmoids(separable, tmp_path):
    """`multiclassova` trains ten binary models: each score is a digit's log-odds against
    the rest, so its probabilities are the ten sigmoids (LightGBM's own prediction), scaled
    to sum to 1; the card records that, and a reloaded model reads its scores the same way."""
    features, labels = separable
    config = GbdtConfig(rounds=15, params={"objective": "multiclassova", "num_leaves": 7,
                                           "min_data_in_leaf": 5, "extra_trees": True,
                                           "max_depth": 3})
    model = train_model("ova", config, features, labels, feature_stage="raw", seed=0,
                        num_threads=1)
    assert model.link is ScoreLink.NORMALISED_SIGMOID
    sigmoids = model.boosters[0].predict(features)
    assert not np.allclose(sigmoids.sum(axis=1), 1.0)  # ten separate binary answers
    probabilities = model.predict_proba(features)
    assert np.allclose(probabilities, sigmoids / sigmoids.sum(axis=1, keepdims=True))
    assert (probabilities.argmax(axis=1) == labels).mean() > 0.95
    loaded = DigitModel.load(model.save(tmp_path / "m"))
    assert loaded.link is ScoreLink.NORMALISED_SIGMOID
    assert np.allclose(loaded.predict_proba(features), probabilities)


def test_a_card_without_a_link_is_a_softmax_model(separable, tmp_path):
    """Bundles published before the link was recorded hold `multiclass` models."""
    import json

    features, labels = separable
    model = train_model("lgbm", GbdtConfig(rounds=3, params={"num_leaves": 4}), features,
                        labels, feature_stage="raw", seed=0, num_threads=1)
    folder = model.save(tmp_path / "m")
    card = json.loads((folder / "model.json").read_text())
    assert card["link"] == "softmax"
    del card["link"]
    (folder / "model.json").write_text(json.dumps(card))
    loaded = DigitModel.load(folder)
    assert loaded.link is ScoreLink.SOFTMAX
    assert np.allclose(loaded.predict_proba(features), model.boosters[0].predict(features))


def test_the_card_carries_the_low_confidence_threshold(separable, tmp_path):
    """Set on the saved card, the boosters untouched; a card from before thresholds were
    chosen per model reads as the default."""
    import json

    from mlpaint.training.confidence import DEFAULT_LOW_CONFIDENCE_BELOW

    features, labels = separable
    model = train_model("lgbm", GbdtConfig(rounds=3, params={"num_leaves": 4}), features,
                        labels, feature_stage="raw", seed=0, num_threads=1)
    folder = model.save(tmp_path / "m")
    assert DigitModel.load(folder).low_confidence_below == DEFAULT_LOW_CONFIDENCE_BELOW
    booster_text = (folder / "booster-0.txt").read_bytes()
    DigitModel.record_low_confidence_below(folder, 0.83)
    loaded = DigitModel.load(folder)
    assert loaded.low_confidence_below == 0.83 and loaded.card()["low_confidence_below"] == 0.83
    assert (folder / "booster-0.txt").read_bytes() == booster_text
    card = json.loads((folder / "model.json").read_text())
    del card["low_confidence_below"]
    (folder / "model.json").write_text(json.dumps(card))
    assert DigitModel.load(folder).low_confidence_below == DEFAULT_LOW_CONFIDENCE_BELOW


def test_an_objective_mlpaint_cannot_read_is_refused_with_the_config():
    with pytest.raises(ValueError, match="objective 'regression'"):
        GbdtConfig(rounds=3, params={"objective": "regression"})


def test_bagged_boosting_averages_raw_scores(separable):
    features, labels = separable
    config = BaggedBoostingConfig(bags=3, bag_train_fraction=0.66, min_rounds=2, max_rounds=8,
                                  params={"max_depth": 3, "num_leaves": 7,
                                          "feature_fraction": 0.3, "min_data_in_leaf": 5})
    model = train_model("bbdt", config, features, labels, feature_stage="raw", seed=1,
                        num_threads=1)
    assert len(model.boosters) == 3
    assert all(2 <= r <= 8 for r in model.rounds)
    assert [b.current_iteration() for b in model.boosters] == model.rounds
    mean_raw = np.mean([b.predict(features, raw_score=True) for b in model.boosters], axis=0)
    assert np.allclose(model.raw_scores(features), mean_raw)
    assert np.allclose(model.predict_proba(features), softmax(mean_raw))
    assert (model.predict_proba(features).argmax(axis=1) == labels).mean() > 0.9


def test_the_model_card_carries_the_feature_stage(separable, tmp_path):
    """model.json is the one record of what a model reads; loading needs it, with no
    default, and a folder from before it existed is refused by name."""
    import json

    features, labels = separable
    model = train_model("lgbm", GbdtConfig(rounds=3, params={"num_leaves": 4}), features,
                        labels, feature_stage="deskew", seed=0, num_threads=1)
    folder = model.save(tmp_path / "m")
    card = json.loads((folder / "model.json").read_text())
    assert card["feature_stage"] == "deskew" and card["labels"] == list(range(10))
    assert DigitModel.load(folder).feature_stage == "deskew"
    card["format_version"] = 1
    del card["feature_stage"]
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelFormatError, match="did not record the feature stage"):
        DigitModel.load(folder)


def test_pixels_go_through_the_models_own_stage(tmp_path):
    from mlpaint.model.features import apply_feature_stage

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(200, 784)).astype(np.uint8)
    labels = np.arange(200) % 10
    model = train_model("lgbm", GbdtConfig(rounds=3, params={"num_leaves": 4,
                                                              "min_data_in_leaf": 5}),
                        apply_feature_stage("deskew", pixels), labels, feature_stage="deskew",
                        seed=0, num_threads=1)
    expected = model.predict_proba(apply_feature_stage("deskew", pixels[:5]))
    assert np.allclose(model.predict_pixels(pixels[:5]), expected)
    # 0-255 floats (what JSON clients send) read as the same pixels
    assert np.allclose(model.predict_pixels(pixels[:5].astype(np.float32)), expected)
    with pytest.raises(ValueError, match=r"0\.\.255"):
        model.predict_pixels(pixels[:5].astype(np.float32) / 255 - 0.5)


@pytest.mark.parametrize("config", [
    GbdtConfig(rounds=20, params={"num_leaves": 4, "min_data_in_leaf": 1}),
    BaggedBoostingConfig(bags=2, bag_train_fraction=0.7, min_rounds=3, max_rounds=10,
                         params={"num_leaves": 4, "min_data_in_leaf": 1})])
def test_row_weights_decide_between_conflicting_labels(separable, config):
    """The same rows labelled twice, 1 and 2: the weighted labelling wins."""
    features, labels = separable
    blob = labels == 1
    rows = np.concatenate([features, features[blob]])
    relabelled = np.concatenate([labels, np.full(blob.sum(), 2)])
    for heavy in (1, 2):
        weights = np.ones(len(rows), np.float32)
        if heavy == 1:
            weights[np.flatnonzero(blob)] = 5.0  # the rows labelled 1
        else:
            weights[len(features):] = 5.0  # their copies labelled 2
        model = train_model("lgbm", config, rows, relabelled, feature_stage="raw", seed=0,
                            num_threads=1, weights=weights)
        assert (model.predict_proba(features[blob]).argmax(axis=1) == heavy).mean() > 0.9


def test_a_continued_model_keeps_its_trees_and_learns_what_it_could_not_read(separable,
                                                                               tmp_path):
    """A warm start: the base model's trees stay as they were, `rounds` more are fitted to
    the rows given its scores (rows of a style it never saw, labelled by people, among
    them), and the watched rows start from its scores, not from nothing."""
    from mlpaint.training.algorithms import Continuation
    from mlpaint.training.progress import FitMonitor

    features, labels = separable
    config = GbdtConfig(rounds=15, params={"num_leaves": 7, "min_data_in_leaf": 5})
    base = train_model("lgbm", config, features, labels, feature_stage="raw", seed=0,
                       num_threads=1)
    base.low_confidence_below = 0.77
    base = DigitModel.load(base.save(tmp_path / "base"))
    # A new way of writing a 3: far from every blob; the base model reads it as something else.
    rng = np.random.default_rng(1)
    new_style = (rng.normal(0, 5, size=20) + rng.normal(0, 0.5, size=(60, 20))).astype(
        np.float32)
    assert (base.predict_proba(new_style).argmax(axis=1) == 3).mean() < 0.5
    rows = np.concatenate([features, new_style])
    relabelled = np.concatenate([labels, np.full(60, 3)])
    reports = []
    monitor = FitMonitor("final", 10, [reports.append], report_every=1)
    continued = train_model("lgbm", config, rows, relabelled, feature_stage="raw", seed=0,
                            num_threads=1, monitor=monitor, watched_rows=(features, labels),
                            continuation=Continuation(base, rounds=10, learning_rate=0.3))
    booster = continued.boosters[0]
    assert booster.num_trees() == base.boosters[0].num_trees() + 10 * 10
    assert continued.rounds == [25]
    assert np.allclose(booster.predict(features, raw_score=True, num_iteration=15),
                       base.raw_scores(features))
    assert (continued.predict_proba(new_style).argmax(axis=1) == 3).mean() > 0.9
    assert (continued.predict_proba(features).argmax(axis=1) == labels).mean() > 0.95
    assert continued.low_confidence_below == 0.77
    # Rounds counted from the continuation's first; its first point already reads the
    # watched rows as well as the base model (which reads them all).
    assert [r.rounds_done for r in reports] == list(range(1, 11))
    assert reports[0].latest.accuracy > 0.95


@pytest.mark.parametrize(("config", "stage", "problem"), [
    (BaggedBoostingConfig(bags=2, bag_train_fraction=0.7, min_rounds=3, max_rounds=5),
     "raw", "only a gbdt configuration"),
    (GbdtConfig(rounds=5), "moments", "reads the raw feature stage, the spec moments"),
    (GbdtConfig(rounds=5, params={"objective": "multiclassova"}), "raw",
     "scores are softmax"),
])
def test_a_model_that_cannot_be_continued_says_why(separable, config, stage, problem):
    from mlpaint.training.algorithms import Continuation, continuation_problem

    features, labels = separable
    base = train_model("lgbm", GbdtConfig(rounds=3), features, labels, feature_stage="raw",
                       seed=0, num_threads=1)
    assert problem in continuation_problem(base, config, stage)
    assert continuation_problem(base, GbdtConfig(rounds=5), "raw") is None
    with pytest.raises(ValueError, match="cannot continue the model"):
        train_model("lgbm", config, features, labels, feature_stage=stage, seed=0,
                    num_threads=1, continuation=Continuation(base, rounds=2))
