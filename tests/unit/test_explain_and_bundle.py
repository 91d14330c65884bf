"""Exact explanations and the bundle format, on small real models."""

import json

import numpy as np
import pytest

from mlpaint.data.pendigits import drawn_test_writers
from mlpaint.model.explain import AdditivityError, check_additivity, contributions, gallery_rows
from mlpaint.publishing.build import build_bundle_folder, explain_test_set
from mlpaint.publishing.bundle import (
    LATEST,
    BundleIntegrityError,
    load_bundle,
    publish_bundle,
    read_latest,
    verify_bundle,
    write_manifest,
)
from mlpaint.publishing.gate import (
    DrawnScores,
    WildScores,
    decide,
    gate_wild_share,
    held_out_writers,
)
from mlpaint.storage.stores import LocalStore
from mlpaint.training.algorithms import BaggedBoostingConfig, GbdtConfig, train_model


@pytest.fixture(scope="module")
def digits():
    """Blobs in pixel space standing in for digits: 784 uint8 features, 10 classes."""
    rng = np.random.default_rng(0)
    prototypes = rng.integers(0, 256, size=(10, 784))
    labels = np.repeat(np.arange(10), 40).astype(np.uint8)
    noise = rng.integers(-60, 60, size=(400, 784))
    pixels = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    return pixels, labels


@pytest.fixture(scope="module")
def models(digits):
    pixels, labels = digits
    features = pixels.astype(np.float32)
    single = train_model("lgbm", GbdtConfig(rounds=8, params={"num_leaves": 7,
                                                               "min_data_in_leaf": 5}),
                         features, labels, feature_stage="raw", seed=0, num_threads=1)
    bagged = train_model("bbdt", BaggedBoostingConfig(
        bags=3, bag_train_fraction=0.66, min_rounds=2, max_rounds=5,
        params={"max_depth": 3, "num_leaves": 7, "min_data_in_leaf": 5,
                "feature_fraction": 0.3}), features, labels, feature_stage="raw", seed=0,
        num_threads=1)
    return {"single": single, "bagged": bagged}


@pytest.mark.parametrize("kind", ["single", "bagged"])
def test_contributions_add_up_to_the_raw_score(models, digits, kind):
    model = models[kind]
    features = digits[0][:50].astype(np.float32)
    contrib = contributions(model, features, chunk_rows=16)  # several chunks
    assert contrib.shape == (50, 10, 785)
    assert check_additivity(contrib, model.raw_scores(features)) < 1e-9


def test_additivity_failure_is_caught(models, digits):
    features = digits[0][:5].astype(np.float32)
    contrib = contributions(models["single"], features)
    contrib[2, 3, 100] += 1e-3
    with pytest.raises(AdditivityError, match="differ from the raw score"):
        check_additivity(contrib, models["single"].raw_scores(features))


def test_contributions_match_shap_tree_explainer(models, digits):
    import shap

    booster = models["single"].boosters[0]
    features = digits[0][:4].astype(np.float32)
    values = np.asarray(shap.TreeExplainer(booster).shap_values(features))  # (4, 784, 10)
    ours = contributions(models["single"], features)
    assert np.allclose(values.transpose(0, 2, 1), ours[:, :, :784], atol=1e-9)


def test_gallery_rows_are_deterministic_and_prefer_the_held_out_subset():
    labels = np.repeat(np.arange(10), 30)
    row_hash = np.arange(300, dtype=np.uint64) * np.uint64(2654435761)
    chosen = gallery_rows(labels, row_hash, per_digit=5)
    assert chosen.keys() == set(range(10))
    for digit, rows in chosen.items():
        assert len(rows) == 5 and (labels[rows] == digit).all()
        assert (row_hash[rows] % np.uint64(5) == 0).all()
        assert (np.diff(row_hash[rows].astype(np.float64)) > 0).all()  # row-hash order
    assert all(np.array_equal(chosen[d], gallery_rows(labels, row_hash, 5)[d])
               for d in range(10))


@pytest.mark.parametrize(
    ("candidate", "champion", "force", "alias", "forced"),
    [(0.95, 0.94, False, "champion", False), (0.94, 0.94, False, "champion", False),
     (0.93, 0.94, False, "challenger", False), (0.93, 0.94, True, "champion", True),
     (0.50, None, False, "champion", False)],
)
def test_gate_decision(candidate, champion, force, alias, forced):
    decision = decide(candidate, champion, "7" if champion else None, margin=0.0, force=force)
    assert (decision.alias, decision.forced, decision.promote) == (alias, forced,
                                                                   alias == "champion")
    assert decision.reason


@pytest.mark.parametrize(
    ("test_acc", "wild_acc", "alias"),
    [(0.95, 0.80, "champion"), (0.95, 0.79, "challenger"), (0.93, 0.90, "challenger")])
def test_the_gate_needs_both_the_test_set_and_the_wild_set(test_acc, wild_acc, alias):
    wild = WildScores(rows=200, candidate_accuracy=wild_acc, champion_accuracy=0.80)
    decision = decide(test_acc, 0.94, "3", margin=0.0, force=False, wild=wild)
    assert decision.alias == alias
    assert f"{wild_acc:.4f}" in decision.reason and f"{test_acc:.4f}" in decision.reason
    assert "200 feedback drawings" in decision.reason


@pytest.mark.parametrize(
    ("candidate", "champion", "share"),
    [({"feedback.store": "/fb", "feedback.wild_share": "0.1"},
      {"feedback.store": "/fb", "feedback.wild_share": "0.2"}, 0.1),  # the candidate's
     ({"feedback.store": "/fb", "feedback.wild_share": "0.3"},
      {"feedback.store": "/fb", "feedback.wild_share": "0.2"}, 0.2),  # the champion's
     ({"feedback.store": "null", "feedback.wild_share": "0.1"},
      {"feedback.store": "/fb", "feedback.wild_share": "0.25"}, 0.25),  # it trained on none
     ({"feedback.store": "null"}, {"feedback.store": "null"}, 1.0),  # neither did: all
     ({"feedback.store": "/fb", "feedback.wild_share": "0.15"}, None, 0.15)])  # unknown run
def test_the_gate_scores_the_feedback_neither_run_trained_on(candidate, champion, share):
    """A run trains only on records outside its wild buckets, so the smaller share's are
    held out by both; a run that trained on no feedback held out every record."""
    assert gate_wild_share(candidate, champion) == share


@pytest.mark.parametrize(
    ("test_acc", "drawn_acc", "alias"),
    [(0.95, 0.90, "champion"), (0.95, 0.8999, "challenger"), (0.93, 0.99, "challenger")])
def test_the_gate_refuses_a_candidate_that_reads_pen_drawings_worse(test_acc, drawn_acc,
                                                                   alias):
    drawn = DrawnScores(rows=1500, writers=6, candidate_accuracy=drawn_acc,
                        champion_accuracy=0.90)
    decision = decide(test_acc, 0.94, "3", margin=0.0, force=False, drawn=drawn)
    assert decision.alias == alias and decision.drawn == drawn
    assert (f"drawn accuracy {drawn_acc:.4f} against 0.9000 on 1500 pen drawings of 6 "
            f"writers neither trained on: {'not worse' if drawn_acc >= 0.9 else 'worse'}"
            ) in decision.reason


def test_the_drawn_writers_of_a_run_come_from_its_recorded_spec():
    writers = list(range(1, 31))
    trained = held_out_writers({"pen.renderings": "2", "pen.test_share": "0.2"}, writers)
    assert trained == drawn_test_writers(writers, 0.2) and len(trained) == 6
    # A run that drew no pen digits (older, or renderings 0) trained on no writer at all.
    assert held_out_writers({}, writers) == frozenset(writers)
    assert held_out_writers({"pen.renderings": "0", "pen.test_share": "0.2"},
                            writers) == frozenset(writers)


def test_the_reason_says_whether_the_digits_the_models_split_are_more_than_chance():
    """35 test digits only the champion reads right, 33 only the candidate: a gap of 2 in
    10,000 that the margin decides, and that the operator should see is no difference."""
    from mlpaint.training.evaluation import compare_paired

    champion = np.ones(10_000, dtype=bool)
    candidate = champion.copy()
    champion[:33] = False
    candidate[33:68] = False
    paired = compare_paired(champion, candidate)
    decision = decide(0.9909, 0.9911, "1", margin=0.0, force=False, paired=paired)
    assert decision.alias == "challenger" and decision.paired == paired
    assert ("worse by more than the margin; 68 of 10000 digits read differently, 35 right "
            "only with the champion and 33 only with the candidate, sign test p = 0.9"
            ) in decision.reason


def test_margin_admits_a_slightly_worse_candidate():
    assert decide(0.935, 0.94, "1", margin=0.01, force=False).alias == "champion"
    assert decide(0.925, 0.94, "1", margin=0.01, force=False).alias == "challenger"


def _bundle(tmp_path, models, digits, name="b", version="1"):
    pixels, labels = digits
    row_hash = np.arange(len(labels), dtype=np.uint64) * np.uint64(40503)
    explanations = explain_test_set(models["single"], pixels.astype(np.float32), pixels,
                                    labels, row_hash, [f"test-{i:05d}" for i in range(400)],
                                    per_digit=4)
    folder = tmp_path / name
    info = build_bundle_folder(folder, models["single"], explanations, model_name="m",
                               model_version=version, run_id="r",
                               metrics={"test_accuracy": explanations.test_accuracy},
                               data_fingerprint={"dataset": "f"})
    return folder, info


def test_bundle_round_trip_and_gallery(tmp_path, models, digits):
    folder, info = _bundle(tmp_path, models, digits)
    loaded = load_bundle(str(folder))
    assert loaded.info == info and info.gallery["rows"] == 40
    gallery = loaded.gallery()
    assert gallery["contributions"].dtype == np.float32
    assert gallery["contributions"].shape == (40, 10, 785)
    assert list(gallery["offsets"]) == list(range(0, 41, 4))
    raw = loaded.model().raw_scores(gallery["features"])
    assert np.abs(gallery["contributions"].sum(axis=2, dtype=np.float64) - raw).max() < 1e-4
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "gallery/gallery.npz" in manifest["files"] and "manifest.json" not in manifest["files"]


def test_tampered_and_missing_files_are_named(tmp_path, models, digits):
    folder, _ = _bundle(tmp_path, models, digits)
    booster = folder / "model" / "booster-0.txt"
    booster.write_text(booster.read_text().replace("num_class=10", "num_class=10 "))
    with pytest.raises(BundleIntegrityError, match=r"booster-0\.txt: sha256 .* does not match"):
        verify_bundle(folder)
    folder, _ = _bundle(tmp_path, models, digits, name="c")
    (folder / "explanations" / "mean_contributions.npy").unlink()
    with pytest.raises(BundleIntegrityError, match=r"mean_contributions\.npy: missing"):
        load_bundle(str(folder))
    (folder / "manifest.json").unlink()
    with pytest.raises(BundleIntegrityError, match="no LATEST pointer"):
        load_bundle(str(folder))


def test_latest_moves_only_on_promotion_and_retention_keeps_it(tmp_path, models, digits):
    store = LocalStore(tmp_path / "dest")
    first, first_info = _bundle(tmp_path, models, digits, "v1", "1")
    publish_bundle(first, store, "20260101T000000Z-v1", promote=True, retention=2)
    assert read_latest(store) == "20260101T000000Z-v1"
    second, _ = _bundle(tmp_path, models, digits, "v2", "2")
    result = publish_bundle(second, store, "20260102T000000Z-v2", promote=False, retention=2)
    assert result.latest == "20260101T000000Z-v1" and not result.promoted
    assert load_bundle(str(store.root)).info == first_info
    for day in (3, 4):
        publish_bundle(second, store, f"2026010{day}T000000Z-v2", promote=False, retention=2)
    # retention 2: the newest two stay, and so does the one LATEST names
    assert store.list_folders("versions") == ["20260101T000000Z-v1", "20260103T000000Z-v2",
                                     "20260104T000000Z-v2"]
    assert (store.root / LATEST).read_text().strip() == "20260101T000000Z-v1"


def test_manifest_lists_every_file(tmp_path):
    (tmp_path / "a").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_text("y")
    assert sorted(write_manifest(tmp_path)["files"]) == ["a", "sub/b"]


@pytest.mark.parametrize("kind", ["single", "bagged"])
def test_class_explainer_equals_the_full_computation(models, digits, kind):
    from mlpaint.model.explain import ClassExplainer

    model = models[kind]
    features = digits[0][:30].astype(np.float32)
    full = contributions(model, features)
    explainer = ClassExplainer(model)
    some = explainer.explain(features, [7, 2])
    assert np.allclose(some[:, 0], full[:, 7], atol=1e-12)
    assert np.allclose(some[:, 1], full[:, 2], atol=1e-12)
    labels = digits[1][:30]
    own = explainer.explain_own_class(features, labels)
    assert np.allclose(own, full[np.arange(30), labels], atol=1e-12)


def test_contributions_too_large_for_float32_are_stored_as_float64():
    """A model whose raw scores run into the thousands (unregularised boosting on
    near-duplicate rows) has contributions float32 cannot hold to 1e-4 in sum; the gallery
    keeps those as float64, and ordinary ones as float32."""
    from mlpaint.publishing.build import _stored_contributions

    rng = np.random.default_rng(0)
    ordinary = rng.normal(0, 0.05, (4, 10, 785))
    huge = ordinary * 2e5
    for exact, dtype in ((ordinary, np.float32), (huge, np.float64)):
        raw = exact.sum(axis=2)
        stored = _stored_contributions(exact, raw)
        assert stored.dtype == dtype
        assert check_additivity(stored, raw) <= 1e-4
    assert check_additivity(huge, huge.sum(axis=2)) <= 1e-4
    with pytest.raises(AdditivityError):
        check_additivity(huge.astype(np.float32), huge.sum(axis=2))
