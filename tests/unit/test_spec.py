import numpy as np
import pytest

from flows.steps import experiment_spec
from mlpaint.images.augment import AugmentSpec
from mlpaint.training.spec import (
    ExperimentSpec,
    KFolds,
    MldbFolds,
    RowHashRule,
    SpecError,
    check_spec,
    load_spec,
    parse_folds_option,
    plan_folds,
)

KNOWN = frozenset({"lgbm", "bbdt_d5"})


def test_packaged_default_is_mldbs_split():
    spec = load_spec(known_algorithms=KNOWN)
    assert spec.algorithm == "lgbm" and spec.features.value == "moments"
    assert spec.folds == MldbFolds(training_where="rowHash() % 5 != 0",
                                   testing_where="rowHash() % 5 = 0")
    flat = spec.flat_params()
    assert flat["folds.training_where"] == "rowHash() % 5 != 0" and flat["limit"] == "null"


def test_overrides_and_yaml_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("algorithm: bbdt_d5\nfolds: {kind: kfold, k: 4}\nseed: 7\n")
    spec = load_spec(path, {"seed": 9, "limit": None}, known_algorithms=KNOWN)
    assert (spec.algorithm, spec.folds, spec.seed) == ("bbdt_d5", KFolds(k=4), 9)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"algorithm": "svm"}, "algorithm: unknown 'svm'"),
        ({"folds": {"kind": "kfold", "k": 1}}, "folds.kfold.k: Value error, k must be at least 2"),
        ({"folds": {"kind": "mldb", "testing_where": "rowHash() % 5 = 7"}},
         "folds.testing_where: .* selects no rows"),
        ({"folds": {"kind": "mldb", "training_where": "rand() < 0.8"}},
         "folds.training_where: .* is not of the form"),
        ({"limit": 5}, "limit: Input should be greater than or equal to 100"),
        ({"features": "blur"}, "features: Input should be 'raw', 'deskew' or 'moments'"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"warm_start": {"alias": "champion"}, "final_fit": False},
         "warm_start.alias: 'champion' asks to continue a model, .* final_fit is false"),
        ({"warm_start": {"rounds": 0}}, "warm_start.rounds: Input should be greater than"),
        ({"low_confidence_below": 1.0}, "low_confidence_below: Input should be less than 1"),
    ],
)
def test_invalid_specs_name_the_field(overrides, message):
    with pytest.raises(SpecError, match=message):
        load_spec(None, overrides, known_algorithms=KNOWN)


def test_folds_option():
    assert parse_folds_option("mldb") == MldbFolds()
    assert parse_folds_option("5") == KFolds(k=5)
    assert parse_folds_option("none") is None
    for bad in ("1", "five"):
        with pytest.raises(SpecError, match="folds"):
            parse_folds_option(bad)


def test_a_spec_without_folds_plans_none_and_may_name_its_threshold(tmp_path):
    path = tmp_path / "final-only.yaml"
    path.write_text("folds: null\nlow_confidence_below: 0.8\n")
    spec = load_spec(path, known_algorithms=KNOWN)
    assert spec.folds is None and spec.low_confidence_below == 0.8
    assert plan_folds(spec.folds, np.arange(50, dtype=np.uint64)) == []
    assert spec.flat_params()["folds"] == "null"
    # A change may set the folds back: the command line's `--folds mldb` on it.
    assert load_spec(path, changes={"folds": {"kind": "mldb"}}).folds == MldbFolds()
    with pytest.raises(SpecError, match="folds: none and final_fit: false leave nothing"):
        load_spec(path, {"final_fit": False})


def test_rule_semantics():
    rule = RowHashRule.parse("rowHash() % 5 != 0", "f")
    hashes = np.arange(10, dtype=np.uint64)
    assert rule.mask(hashes).tolist() == [h % 5 != 0 for h in range(10)]
    assert RowHashRule.parse("rowHash() % 4 <= 1", "f").residues() == {0, 1}


def test_mldb_plan_partitions_rows():
    hashes = np.arange(100, dtype=np.uint64) * np.uint64(7919)
    (plan,) = plan_folds(MldbFolds(), hashes)
    assert len(plan.train_rows) + len(plan.test_rows) == 100
    assert not set(plan.train_rows) & set(plan.test_rows)
    assert all(int(hashes[i]) % 5 == 0 for i in plan.test_rows)


def test_kfold_plan_tests_each_row_once():
    hashes = np.arange(50, dtype=np.uint64)
    plans = plan_folds(KFolds(k=3), hashes)
    tested = np.concatenate([p.test_rows for p in plans])
    assert sorted(tested.tolist()) == list(range(50))
    assert all(int(hashes[r]) % 3 == p.index for p in plans for r in p.test_rows)


def test_a_fold_left_empty_by_the_data_is_an_error():
    hashes = np.array([0, 5, 10], dtype=np.uint64)  # every row has hash % 5 == 0
    with pytest.raises(SpecError, match="fold 0 has no training rows"):
        plan_folds(MldbFolds(), hashes)


def test_packaged_specs_by_name():
    known = frozenset({"lgbm", "champion"})
    default = load_spec("default", known_algorithms=known)
    champion = load_spec("champion", known_algorithms=known)
    assert default == load_spec(None, known_algorithms=known)
    assert default.augment.copies >= 1  # the default learns from augmented drawings too
    assert champion.algorithm == "champion" and champion.augment.copies > default.augment.copies
    with pytest.raises(SpecError, match="'nosuch' is neither a file nor a packaged spec"):
        load_spec("nosuch")


def test_augment_section_is_validated_with_its_field_named(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("augment: {copies: 2, affine: {scale_min: 1.2}}\n")
    with pytest.raises(SpecError, match=r"augment\.affine\.scale_min"):
        load_spec(path)
    path.write_text("augment: {copies: 2, elastic: {probability: 0}}\n")
    spec = load_spec(path)
    assert spec.augment.elastic.probability == 0 and spec.augment.affine.probability == 1.0
    assert spec.flat_params()["augment.elastic.probability"] == "0.0"


def test_the_form_defaults_are_the_packaged_default_spec():
    """A run form fills a field nobody gave from the schema: ExperimentSpec's defaults, and a
    nested section's own (AugmentSpec's for `augment`), all the packaged default spec's."""
    assert ExperimentSpec() == load_spec("default")
    assert AugmentSpec() == load_spec("default").augment


def test_a_deployment_stores_the_whole_spec_its_build_step_names():
    """flows.steps.experiment_spec, run by `prefect deploy`: the named spec with the changes
    applied section by section (a fold rule whole), as JSON that reads back to the same spec."""
    changes = {"limit": 1200, "augment": {"copies": 0}, "feedback": {"store": "/srv/feedback"},
               "folds": {"kind": "kfold", "k": 3}}
    stored = experiment_spec("champion", changes)["spec"]
    champion = load_spec("champion")
    spec = ExperimentSpec.model_validate(stored)
    assert spec.model_fields_set == set(ExperimentSpec.model_fields)  # every field, given
    assert spec.algorithm == champion.algorithm == "champion"
    assert (spec.limit, spec.augment.copies, spec.folds) == (1200, 0, KFolds(k=3))
    assert spec.augment.affine == champion.augment.affine  # the section's other fields
    assert spec.feedback.store == "/srv/feedback" and spec.feedback.weight == 1.0
    assert ExperimentSpec.model_validate(experiment_spec("champion")["spec"]) == champion
    assert ExperimentSpec.model_validate(experiment_spec()["spec"]) == ExperimentSpec()
    with pytest.raises(SpecError, match="algorithm: unknown 'svm'"):
        experiment_spec("default", {"algorithm": "svm"})


def test_a_bad_field_given_to_a_run_is_named():
    with pytest.raises(SpecError, match="algorithm: unknown 'svm'"):
        check_spec(ExperimentSpec(algorithm="svm"), KNOWN)
