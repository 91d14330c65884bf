"""Every stored artefact's key names what the artefact depends on, and only that: a change to
one of its inputs makes a new key (so nothing stale is read back), a change to anything else
keeps it (so nothing is made twice)."""

import pytest

import mlpaint.training.keys as keys
from mlpaint.images.augment import AugmentSpec
from mlpaint.model.feature_stages import FeatureStage
from mlpaint.training.algorithms import GbdtConfig
from mlpaint.training.spec import PenSpec, load_spec

TABLE = "/cache/tables/0123abcd/train"
INPUTS = ["/store/features/aaa", "/store/augmented/bbb"]


def test_a_content_key_is_the_same_for_the_same_inputs_in_any_order():
    assert keys.content_key(a=1, b=[2, 3]) == keys.content_key(b=[2, 3], a=1)
    assert keys.content_key(a=1, b=[2, 3]) != keys.content_key(a=1, b=[3, 2])
    assert len(keys.content_key(a=1)) == 32


def test_a_table_is_named_by_its_content_key_wherever_it_lies():
    assert keys.table_key(TABLE) == "0123abcd/train"
    assert keys.table_key("s3://bucket/run/tables/0123abcd/train/") == "0123abcd/train"
    assert keys.features_key(TABLE, FeatureStage.DESKEW, None) == keys.features_key(
        "s3://bucket/tables/0123abcd/train", FeatureStage.DESKEW, None)


def test_features_are_keyed_by_table_stage_limit_and_code(monkeypatch):
    base = keys.features_key(TABLE, FeatureStage.DESKEW, None)
    assert keys.features_key("/cache/tables/0123abcd/test", FeatureStage.DESKEW, None) != base
    assert keys.features_key(TABLE, FeatureStage.RAW, None) != base
    assert keys.features_key(TABLE, FeatureStage.DESKEW, 1000) != base
    monkeypatch.setattr(keys, "FEATURE_CODE_VERSION", "older")
    assert keys.features_key(TABLE, FeatureStage.DESKEW, None) != base


def test_augmented_rows_change_with_the_augmentation_and_the_seed():
    spec = AugmentSpec(copies=1)
    base = keys.augmented_key(TABLE, FeatureStage.DESKEW, None, spec, 0)
    assert keys.augmented_key(TABLE, FeatureStage.DESKEW, None, spec, 1) != base
    assert keys.augmented_key(TABLE, FeatureStage.DESKEW, None, AugmentSpec(copies=2), 0) != base


def test_pen_drawings_ignore_where_the_trajectories_came_from_and_their_weight():
    augment = AugmentSpec(copies=1)
    base = keys.pen_matrix_key(TABLE, PenSpec(), FeatureStage.DESKEW, None, augment, 0)
    same = PenSpec(sources=["https://mirror.example/pendigits-orig.tra.Z"], weight=3.0)
    assert keys.pen_matrix_key(TABLE, same, FeatureStage.DESKEW, None, augment, 0) == base
    more = PenSpec(renderings=4)
    assert keys.pen_matrix_key(TABLE, more, FeatureStage.DESKEW, None, augment, 0) != base


def test_feedback_rows_change_with_the_snapshot_and_the_wild_share():
    augment = AugmentSpec(copies=1)
    base = keys.feedback_key("digest-a", FeatureStage.DESKEW, 0.2, augment, 0)
    assert keys.feedback_key("digest-b", FeatureStage.DESKEW, 0.2, augment, 0) != base
    assert keys.feedback_key("digest-a", FeatureStage.DESKEW, 0.3, augment, 0) != base


@pytest.fixture
def spec():
    return load_spec(None, {"limit": 2000})


def test_a_fit_ignores_the_experiments_name_and_where_its_data_came_from(spec):
    config = GbdtConfig(rounds=10, params={"num_leaves": 7})
    base = keys.fold_fit_key(spec, config, 0, INPUTS)
    renamed = spec.model_copy(update={"experiment": "another", "sources": ["/elsewhere"],
                                      "final_fit": not spec.final_fit})
    assert keys.fold_fit_key(renamed, config, 0, INPUTS) == base
    # The inputs are named by their keys, not by where the store keeps them.
    assert keys.fold_fit_key(spec, config, 0, [f"s3://b/p{uri}" for uri in INPUTS]) == base


def test_a_fit_changes_with_its_fold_config_inputs_and_base_model(spec):
    config = GbdtConfig(rounds=10, params={"num_leaves": 7})
    base = keys.fold_fit_key(spec, config, 0, INPUTS)
    assert keys.fold_fit_key(spec, config, 1, INPUTS) != base
    assert keys.fold_fit_key(spec, GbdtConfig(rounds=11, params={"num_leaves": 7}), 0,
                             INPUTS) != base
    assert keys.fold_fit_key(spec, config, 0, INPUTS[:1]) != base
    assert keys.fold_fit_key(spec.model_copy(update={"seed": spec.seed + 1}), config, 0,
                             INPUTS) != base
    final = keys.final_fit_key(spec, config, INPUTS, None)
    assert final != base
    assert keys.final_fit_key(spec, config, INPUTS, "/store/base-models/ccc") != final
