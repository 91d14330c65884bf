"""The training flow on Prefect's test harness with a real SQLite MLflow store, on a small
slice of the real MNIST (a few thousand rows, few rounds)."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.train import train_mnist
from mlpaint.images.augment import AugmentSpec
from mlpaint.processes import free_port, start_service, stop_service
from mlpaint.publishing.bundle import load_bundle
from mlpaint.training.fits import fit_threads
from mlpaint.training.spec import ExperimentSpec, FeedbackSpec, KFolds, MldbFolds
from tests.conftest import official_test_digits, run_cli, wait_for
from tests.servers.dask_cluster import dask_cluster

pytestmark = pytest.mark.integration

TINY_ALGORITHMS = """
lgbm:
  kind: gbdt
  rounds: 12
  params: {learning_rate: 0.3, num_leaves: 15, min_data_in_leaf: 10, max_bin: 31}
bbdt_d5:
  kind: bagged_boosting
  bags: 2
  bag_train_fraction: 0.66
  min_rounds: 2
  max_rounds: 6
  params: {learning_rate: 0.3, max_depth: 5, num_leaves: 31, feature_fraction: 0.3,
           min_data_in_leaf: 10, max_bin: 31}
"""


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def training_inputs(tmp_path_factory, shared_mnist):
    root = tmp_path_factory.mktemp("training")
    algorithms = root / "algorithms.yaml"
    algorithms.write_text(TINY_ALGORITHMS)
    return {"source": str(shared_mnist), "cache": str(root / "cache"),
            "algorithms": str(algorithms), "root": root}


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _artifact_paths(client, run_id, path=None):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def _assert_pen_drawings_train_by_writer_and_score_every_model(summary, client, parent,
                                                               k: int) -> None:
    """The pen drawings (the first `limit` digits of the packaged trajectories): each fold
    trains on the renderings of its training-side writers only, the final model on every
    training writer's; no held-out writer trains anything; every model is scored on the
    drawn test set, and MLflow shows it beside the official test set."""
    pen = summary.pen
    writers = pen.writers()
    assert writers["train"] and writers["drawn"]
    assert not set(writers["train"]) & set(writers["drawn"])
    assert pen.drawn_writers == len(writers["drawn"]) and pen.drawn_rows > 50
    _, _, row_hash = pen.load_train()
    assert len(row_hash) == pen.train_rows == summary.final.pen_rows
    for fold in summary.folds:
        index = int(fold.name.removeprefix("fold-"))
        # A writer's rows share its hash: the fold's rule keeps each writer on one side.
        assert fold.pen_rows == int((row_hash % k != index).sum()) > 0
        assert fold.drawn_evaluation.rows == pen.drawn_rows
        # Scored on its held-out writers' renderings (not their augmented copies) too; the
        # "not sure" threshold is chosen on those and their copies.
        rendered_hash = row_hash[:pen.rendered_rows]
        assert fold.heldout_drawn_evaluation.rows == int((rendered_hash % k == index).sum())
        top, right = fold.confidence_rows("heldout")
        assert top.size == right.size == int((row_hash % k == index).sum())
    assert 0 < pen.rendered_rows < pen.train_rows  # the rest: their augmented copies
    assert len({int(h) for h in row_hash}) == len(writers["train"])
    drawn = summary.final.drawn_evaluation
    assert drawn.rows == pen.drawn_rows and 0.5 < drawn.accuracy <= 1.0
    metrics = parent.data.metrics
    assert metrics["drawn_accuracy"] == pytest.approx(drawn.accuracy)
    assert metrics["drawn_rows"] == pen.drawn_rows
    assert metrics["drawn_worst_writer_accuracy"] == pytest.approx(
        min(summary.final.drawn_writer_accuracy.values()))
    assert metrics["drawn_worst_writer_accuracy"] <= metrics["drawn_accuracy"]
    assert {f"drawn_digit_{d}_accuracy" for d in range(10)} <= set(metrics)
    assert "test_accuracy" in metrics
    # The registered model's own page shows its figures, logged against its model id.
    on_model = {m.key: m.value
                for m in client.get_logged_model(summary.registered.model_id).metrics}
    for key in ("test_accuracy", "drawn_accuracy", "drawn_worst_writer_accuracy",
                "low_confidence_below"):
        assert on_model[key] == pytest.approx(metrics[key]), key
    assert not any(key.startswith("folds_") for key in on_model)
    # "Not sure" is chosen on the folds' held-out writers, measured on the drawn test set.
    chosen = summary.low_confidence
    assert chosen.figures.rows == sum(f.confidence_rows("heldout")[0].size
                                      for f in summary.folds)
    assert metrics["low_confidence_below"] == chosen.threshold
    assert metrics["heldout_drawn_marked_share"] == pytest.approx(chosen.figures.marked_share)
    assert summary.drawn_low_confidence.rows == pen.drawn_rows
    assert metrics["drawn_marked_share"] == pytest.approx(
        summary.drawn_low_confidence.marked_share)
    inputs = {d.dataset.name: d for d in client.get_run(parent.info.run_id).inputs.dataset_inputs}
    assert {"pen-drawings", "pen-drawn-test"} <= set(inputs)
    paths = set(_artifact_paths(client, parent.info.run_id))
    assert {"data/sample-grid-pen.png", "evaluation/drawn/confusion_matrix.json"} <= paths


def test_kfold_flow_leaves_the_run_tree_and_registered_model(harness, training_inputs,
                                                             tracking):
    summary = train_mnist(ExperimentSpec(folds=KFolds(k=3), limit=1500,
                                sources=[training_inputs["source"]], experiment="tiny-kfold",
                                eval_train=True),
                          algorithms_path=training_inputs["algorithms"],
                          cache_dir=training_inputs["cache"])
    client = tracking
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_url"].endswith(
        "/flow-run/" + parent.data.tags["prefect.flow_run_id"])
    assert parent.data.params["folds.kind"] == "kfold" and parent.data.params["folds.k"] == "3"
    assert parent.data.params["lightgbm.num_leaves"] == "15"
    aggregated = summary.aggregated["accuracy"]
    assert parent.data.metrics["folds_accuracy_mean"] == pytest.approx(aggregated.mean)
    assert parent.data.metrics["folds_accuracy_min"] <= aggregated.mean
    assert parent.data.metrics["test_accuracy"] == pytest.approx(
        summary.final.evaluation.accuracy)
    assert 0.7 < summary.final.evaluation.accuracy <= 1.0  # a real model, even a tiny one
    # The run's resources: this process's peak memory (at least the 1,500-row matrices and
    # Python itself) and the cache it filled.
    assert 100 < parent.data.metrics["resources/peak_rss_mb"] < 24_000
    assert parent.data.metrics["resources/cache_mb"] > 1
    # The fits ran in this process: their peak is no larger than its peak.
    assert 100 < parent.data.metrics["resources/fit_peak_rss_mb"] <= parent.data.metrics[
        "resources/peak_rss_mb"]

    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == [
        "fold-0", "fold-1", "fold-2"]
    by_name = {r.data.tags["mlflow.runName"]: r for r in children}
    for fold in summary.folds:
        child = by_name[fold.name]
        assert child.data.metrics["accuracy"] == pytest.approx(fold.evaluation.accuracy)
        assert "train_accuracy" in child.data.metrics  # eval_train
        assert child.data.metrics["heldout_drawn_accuracy"] == pytest.approx(
            fold.heldout_drawn_evaluation.accuracy)
        # Its learning curve on its held-out rows, by round: the chart ends at the fold's
        # own accuracy (the same rows, scored after the last round).
        curve = client.get_metric_history(child.info.run_id, "learning_curve/accuracy")
        assert [m.step for m in curve] == list(range(1, 13))  # the tiny lgbm's 12 rounds
        assert curve[-1].value == pytest.approx(fold.evaluation.accuracy)
        assert len(client.get_metric_history(child.info.run_id,
                                             "learning_curve/log_loss")) == 12
        paths = _artifact_paths(client, child.info.run_id)
        assert {"evaluation/confusion_matrix.json", "evaluation/confusion_matrix.png",
                "evaluation/label_statistics.csv", "model/model.json",
                "model/booster-0.txt"} <= set(paths)
    assert sum(f.test_rows for f in summary.folds) == 1500
    # The default spec's one augmented copy per row: each fold trains on its own rows and
    # their copies only, the final model on every row and every copy (and pen renderings).
    assert parent.data.params["augment.copies"] == "1"
    for fold in summary.folds:
        assert fold.train_rows == 2 * (1500 - fold.test_rows) + fold.pen_rows
    assert summary.final.train_rows == 3000 + summary.final.pen_rows
    _assert_pen_drawings_train_by_writer_and_score_every_model(summary, client, parent, 3)

    parent_paths = set(_artifact_paths(client, parent.info.run_id))
    assert {"evaluation/test/confusion_matrix.json", "evaluation/test/confusion_matrix.png",
            "spec.json", "summary.json", "data/sample-grid-train.png"} <= parent_paths
    # The final model's curve, on the official test set, on the parent run.
    final_curve = client.get_metric_history(parent.info.run_id, "learning_curve/accuracy")
    assert final_curve[-1].step == 12
    assert final_curve[-1].value == pytest.approx(summary.final.evaluation.accuracy)
    _assert_each_fit_showed_its_progress(parent.data.tags["prefect.flow_run_id"], 4)
    local = client.download_artifacts(parent.info.run_id, "evaluation/test/confusion_matrix.json")
    with open(local) as handle:
        assert json.load(handle)["matrix"] == summary.final.evaluation.confusion

    version = client.get_model_version("mnist-digits", summary.registered.version)
    assert version.run_id == parent.info.run_id
    import mlflow

    # Self-contained: it takes pixels as an MLflow user has them and applies its own stage.
    model = mlflow.pyfunc.load_model(summary.registered.model_uri)
    card = model.metadata.metadata
    assert card["feature_stage"] == "moments" and card["labels"] == list(range(10))
    assert card["low_confidence_below"] == summary.low_confidence.threshold
    assert model.metadata.get_input_schema().input_names() == ["pixels"]
    pixels, labels = official_test_digits(training_inputs["source"], 300)
    accuracy = (np.asarray(model.predict(pixels.astype(np.float32))).argmax(axis=1)
                == labels).mean()
    assert accuracy > 0.7


def _assert_each_fit_showed_its_progress(flow_run_id: str, fits: int) -> None:
    """The flow run's progress artifacts: its own (fits done) and one per fit, each at 100%
    and saying how its last round scored."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )

    with get_client(sync_client=True) as prefect:
        progress = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            type=ArtifactFilterType(any_=["progress"])))
    assert len(progress) == fits + 1
    assert all(float(artifact.data) == 100.0 for artifact in progress)
    per_fit = sorted(a.description for a in progress if a.task_run_id is not None)
    assert len(per_fit) == fits
    assert per_fit[0].startswith("final: round 12 of 12 (100%), official test set: accuracy")
    assert per_fit[1].startswith("fold-0: round 12 of 12 (100%), held-out rows: accuracy")


def test_a_spec_without_folds_trains_the_final_model_alone_on_every_core(
        harness, training_inputs, tracking):
    """`folds: null` (the champion's): no fold trains, the final model gets every core, and
    it carries the spec's "not sure" threshold, measured on the drawn test set."""
    summary = train_mnist(ExperimentSpec(folds=None, low_confidence_below=0.77, limit=1500,
                                         sources=[training_inputs["source"]],
                                         experiment="tiny-final-only"),
                          algorithms_path=training_inputs["algorithms"],
                          cache_dir=training_inputs["cache"])
    assert summary.folds == [] and summary.aggregated == {} and summary.low_confidence is None
    assert summary.final.threads == fit_threads(1) == (os.cpu_count() or 1)
    assert summary.low_confidence_below == 0.77
    parent = tracking.get_run(summary.parent_run_id)
    children = tracking.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")
    assert children == [] and parent.data.params["folds"] == "null"
    metrics = parent.data.metrics
    assert metrics["low_confidence_below"] == 0.77
    assert not any(key.startswith(("folds_", "heldout_drawn_")) for key in metrics)
    drawn = summary.drawn_low_confidence
    assert drawn.threshold == 0.77 and drawn.rows == summary.pen.drawn_rows
    reported = summary.to_json()["low_confidence"]
    assert (reported["below"], reported["chosen"], reported["drawn"]["rows"]) == (
        0.77, None, summary.pen.drawn_rows)
    assert metrics["drawn_marked_share"] == pytest.approx(drawn.marked_share)
    import mlflow

    card = mlflow.pyfunc.load_model(summary.registered.model_uri).metadata.metadata
    assert card["low_confidence_below"] == 0.77


def test_bagged_flow_registers_a_pyfunc(harness, training_inputs, tracking):
    summary = train_mnist(ExperimentSpec(algorithm="bbdt_d5", features="raw", limit=1000,
                                sources=[training_inputs["source"]], experiment="tiny-bbdt",
                                augment=AugmentSpec(copies=0)),
                          algorithms_path=training_inputs["algorithms"],
                          cache_dir=training_inputs["cache"])
    assert len(summary.folds) == 1  # MLDB's rowHash() % 5 split
    fold = summary.folds[0]
    assert fold.train_rows - fold.pen_rows + fold.test_rows == 1000  # no copies
    import mlflow

    model = mlflow.pyfunc.load_model(summary.registered.model_uri)
    pixels, _ = official_test_digits(training_inputs["source"], 2)
    probabilities = np.asarray(model.predict(pixels.astype(np.float32)))
    assert probabilities.shape == (2, 10) and np.allclose(probabilities.sum(axis=1), 1)
    assert model.metadata.metadata["algorithm"] == "bbdt_d5"


def test_mlflow_scoring_server_answers_pixels(harness, training_inputs, tracking, tmp_path):
    """MLflow's own scoring server as the client: `mlflow models serve` on the registered
    model, sent official test digits as 0-255 pixels, agrees with the model in process."""
    summary = train_mnist(ExperimentSpec(limit=1000, sources=[training_inputs["source"]],
                                experiment="tiny-served", augment=AugmentSpec(copies=0)),
                          algorithms_path=training_inputs["algorithms"],
                          cache_dir=training_inputs["cache"])
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    mlflow_cli = os.path.join(bin_dir, "mlflow")
    # The scoring server execs `uvicorn` from PATH: the virtualenv's, as if activated. It
    # refuses pickled models: the registered one is logged as code.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    server = start_service(
        [mlflow_cli, "models", "serve", "-m", summary.registered.model_uri,
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        f"http://127.0.0.1:{port}/ping", env=env, log=tmp_path / "serve.log",
        timeout_s=120)
    try:
        pixels, labels = official_test_digits(training_inputs["source"], 200)
        response = requests.post(f"http://127.0.0.1:{port}/invocations",
                                 json={"inputs": pixels.tolist()}, timeout=60)
        assert response.status_code == 200, response.text
        served = np.asarray(response.json()["predictions"])
    finally:
        stop_service(server)
    import mlflow

    in_process = mlflow.pyfunc.load_model(summary.registered.model_uri).predict(
        pixels.astype(np.float32))
    assert served.shape == (200, 10)
    assert np.array_equal(served.argmax(axis=1), np.asarray(in_process).argmax(axis=1))
    assert (served.argmax(axis=1) == labels).mean() > 0.7


def _feedback_store(root, mnist: str, count: int = 150):
    """A feedback store of `count` official test digits (rows 2000 on, labelled as MNIST
    labels them; the app "answered" every fourth wrongly), ten of them rejected."""
    from mlpaint.feedback.store import FeedbackRecord, FeedbackStore

    pixels, labels = official_test_digits(mnist, 2000 + count)
    store = FeedbackStore.at(str(root))
    records = [FeedbackRecord.new(label=int(labels[i]), pixels=pixels[i],
                                  answered_digit=(int(labels[i]) + (i % 4 == 0)) % 10)
               for i in range(2000, 2000 + count)]
    for record in records:
        store.add(record)
    rejected = {records[i].id for i in range(0, 100, 10)}
    for record_id in rejected:
        store.reject(record_id, "test")
    return store, rejected


def test_feedback_trains_every_model_and_the_wild_set_scores_them(harness, training_inputs,
                                                                  tracking, tmp_path):
    from mlpaint.feedback.store import feedback_row_hashes, wild_rows

    store, rejected = _feedback_store(tmp_path / "feedback", training_inputs["source"])
    summary = train_mnist(ExperimentSpec(folds=MldbFolds(), limit=1500,
                                sources=[training_inputs["source"]], experiment="tiny-feedback",
                                feedback=FeedbackSpec(store=store.describe())),
                          algorithms_path=training_inputs["algorithms"],
                          cache_dir=training_inputs["cache"])
    feedback = summary.feedback
    assert feedback.rejected == 10 and feedback.train_records + feedback.wild_rows == 140
    assert 10 <= feedback.wild_rows <= 50  # a 20% share of 140 by row hash
    # No record of the wild set, and no rejected record, is among the training rows.
    ids = feedback.record_ids()
    assert not set(ids["wild"]) & set(ids["train"]) and not rejected & set(ids["train"])
    assert set(ids["wild"]) == {i for i, w in zip(
        ids["train"] + ids["wild"],
        wild_rows(feedback_row_hashes(ids["train"] + ids["wild"]), 0.2), strict=True) if w}
    # Every fit trains on its MNIST rows and copies plus the feedback's (with one copy each).
    assert feedback.train_rows == 2 * feedback.train_records
    (fold,) = summary.folds
    assert fold.train_rows == 2 * (1500 - fold.test_rows) + feedback.train_rows + fold.pen_rows
    assert fold.feedback_rows == feedback.train_rows
    assert summary.final.train_rows == 3000 + feedback.train_rows + summary.final.pen_rows
    assert summary.final.wild_evaluation.rows == feedback.wild_rows
    assert 0.5 < summary.final.wild_evaluation.accuracy <= 1.0

    parent = tracking.get_run(summary.parent_run_id)
    assert parent.data.metrics["wild_accuracy"] == pytest.approx(
        summary.final.wild_evaluation.accuracy)
    assert parent.data.metrics["wild_rows"] == feedback.wild_rows
    (child,) = tracking.search_runs([parent.info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert child.data.metrics["wild_accuracy"] == pytest.approx(fold.wild_evaluation.accuracy)
    inputs = {(d.dataset.name, d.tags[0].value): d for d in parent.inputs.dataset_inputs}
    assert set(inputs) == {("mnist-train", "training"), ("mnist-test", "testing"),
                           ("feedback", "training"), ("feedback-wild", "wild test"),
                           ("pen-drawings", "training"), ("pen-drawn-test", "drawn test")}
    assert json.loads(inputs[("pen-drawn-test", "drawn test")].dataset.profile)[
        "num_rows"] == summary.pen.drawn_rows
    assert json.loads(inputs[("feedback-wild", "wild test")].dataset.profile)["num_rows"] == (
        feedback.wild_rows)
    assert json.loads(inputs[("mnist-train", "training")].dataset.profile)["num_rows"] == 1500
    data_artifacts = _artifact_paths(tracking, parent.info.run_id, "data")
    assert "data/sample-grid-feedback.png" in data_artifacts
    recorded = json.loads(Path(tracking.download_artifacts(
        parent.info.run_id, "data/feedback-records.json")).read_text())
    assert (recorded["wild_share"], recorded["digest"]) == (0.2, feedback.digest)
    assert (recorded["train"], recorded["wild"]) == (ids["train"], ids["wild"])
    # The same grid on the Prefect run's Artifacts tab, as an image the UI shows in an <img>.
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (grid,) = client.read_latest_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["mnist-feedback-sample-grid"])))
    prefix = "data:image/png;base64,"
    assert grid.type == "image" and grid.data.startswith(prefix)
    assert base64.b64decode(grid.data[len(prefix):]) == feedback.sample_grid().read_bytes()
    report = summary.to_json()
    assert report["wild"]["wild_rows"] == feedback.wild_rows
    assert report["wild"]["statistics"]["accuracy"] == pytest.approx(
        summary.final.wild_evaluation.accuracy)


def test_the_gate_weighs_the_wild_set_too(harness, training_inputs, tracking, tmp_path):
    """The gate scores the feedback neither run trained on, as each run's recorded spec
    says: a candidate that kept a smaller wild share (0.1) than the champion (0.2) trained
    on some of the champion's wild records, so only its own wild records are scored."""
    store, _ = _feedback_store(tmp_path / "feedback", training_inputs["source"])
    bundles = str(tmp_path / "bundles")
    runs = [train_mnist(ExperimentSpec(limit=1500, seed=seed, sources=[training_inputs["source"]],
                              experiment="tiny-gate", augment=AugmentSpec(copies=0),
                              feedback=FeedbackSpec(store=store.describe(), wild_share=share)),
                        algorithms_path=training_inputs["algorithms"],
                        cache_dir=training_inputs["cache"], publish_to=bundles)
            for seed, share in ((0, 0.2), (1, 0.1))]
    assert runs[0].publication["gate"]["reason"] == "no champion yet"
    assert 0 < runs[1].feedback.wild_rows < runs[0].feedback.wild_rows
    second = runs[1].publication["gate"]
    assert second["wild"]["share"] == 0.1
    assert second["wild"]["rows"] == runs[1].feedback.wild_rows
    assert second["wild"]["candidate_accuracy"] == pytest.approx(
        runs[1].final.wild_evaluation.accuracy)
    assert second["wild"]["champion_accuracy"] is not None
    assert "wild accuracy" in second["reason"] and "official test accuracy" in second["reason"]
    wild_ok = second["wild"]["candidate_accuracy"] >= second["wild"]["champion_accuracy"]
    test_ok = second["candidate_accuracy"] >= second["champion_accuracy"]
    assert second["promote"] == (wild_ok and test_ok)


def test_a_warm_start_continues_the_champion_and_the_gate_weighs_it(harness, training_inputs,
                                                                   tracking, tmp_path):
    """The feedback deployment's warm start: the champion keeps its trees and grows a few
    rounds on MNIST plus the feedback; no fold trains (the champion saw every row a fold
    would hold out); the registered model holds both and keeps the champion's "not sure"
    threshold; the gate weighs it as any candidate. Where no version holds the alias, or
    the spec cannot continue it, the spec trains from nothing, folds and all."""
    from mlpaint.tracking.publication import load_registered_model
    from mlpaint.training.spec import WarmStartSpec

    store, _ = _feedback_store(tmp_path / "feedback", training_inputs["source"])
    bundles = str(tmp_path / "bundles")
    fields = {"limit": 1500, "sources": [training_inputs["source"]], "experiment": "tiny-warm",
              "folds": KFolds(k=2), "augment": AugmentSpec(copies=0),
              "warm_start": WarmStartSpec(alias="champion", rounds=6)}
    args = {"algorithms_path": training_inputs["algorithms"],
            "cache_dir": training_inputs["cache"], "publish_to": bundles}
    cold = train_mnist(ExperimentSpec(**fields), **args)
    assert cold.warm_start is None and len(cold.folds) == 2  # no champion yet
    assert cold.publication["gate"]["reason"] == "no champion yet"

    warm = train_mnist(ExperimentSpec(**fields, feedback=FeedbackSpec(store=store.describe())),
                       **args)
    base = warm.warm_start
    assert warm.folds == [] and base.version == cold.registered.version
    assert (base.alias, base.rounds, base.run_id) == ("champion", 12, cold.parent_run_id)
    assert warm.final.feedback_rows == warm.feedback.train_rows > 0
    uri = os.environ["MLFLOW_TRACKING_URI"]
    champion = load_registered_model("mnist-digits", cold.registered.version, uri)
    model = load_registered_model("mnist-digits", warm.registered.version, uri)
    assert model.rounds == [18] and model.boosters[0].num_trees() == 18 * 10
    pixels, _ = official_test_digits(training_inputs["source"], 300)
    features = model.features(pixels)
    assert np.allclose(model.boosters[0].predict(features, raw_score=True, num_iteration=12),
                       champion.raw_scores(features))
    assert model.low_confidence_below == champion.low_confidence_below
    # The new rounds, watched on the official test set, start from the champion's scores.
    assert [point.round for point in warm.final.curve] == list(range(1, 7))
    assert warm.final.curve[0].accuracy >= cold.final.evaluation.accuracy - 0.02

    parent = tracking.get_run(warm.parent_run_id)
    params = parent.data.params
    assert (params["warm_start.alias"], params["warm_start.rounds"]) == ("champion", "6")
    assert (params["warm_start.base_version"], params["warm_start.base_rounds"]) == (
        cold.registered.version, "12")
    assert parent.data.metrics["low_confidence_below"] == champion.low_confidence_below
    assert "drawn_marked_share" in parent.data.metrics
    assert not tracking.search_runs([parent.info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{warm.parent_run_id}'")
    gate = warm.publication["gate"]
    assert gate["champion_version"] == cold.registered.version
    assert "official test accuracy" in gate["reason"] and "wild accuracy" in gate["reason"]
    test_ok = gate["candidate_accuracy"] >= gate["champion_accuracy"]
    wild_ok = gate["wild"]["candidate_accuracy"] >= gate["wild"]["champion_accuracy"]
    drawn_ok = gate["drawn"]["candidate_accuracy"] >= gate["drawn"]["champion_accuracy"]
    assert gate["promote"] == (test_ok and wild_ok and drawn_ok)

    # A champion the spec cannot continue (another feature stage): trained from nothing.
    raw = train_mnist(ExperimentSpec(**{**fields, "features": "raw"}), **args)
    assert raw.warm_start is None and len(raw.folds) == 2
    assert load_registered_model("mnist-digits", raw.registered.version, uri).rounds == [12]


def test_a_rerun_reuses_the_fits_that_finished(harness, training_inputs, tracking, tmp_path):
    """A run killed after some fits finished, run again: only the missing fit trains (here
    the final model's, whose stored result is removed as if the kill came before it)."""
    import shutil

    cache = str(tmp_path / "cache")
    fields = {"folds": KFolds(k=2), "limit": 1200, "sources": [training_inputs["source"]],
              "experiment": "tiny-rerun", "augment": AugmentSpec(copies=0)}
    args = {"spec": ExperimentSpec(**fields), "algorithms_path": training_inputs["algorithms"],
            "cache_dir": cache}
    first = train_mnist(**args)
    assert not any(f.reused for f in [*first.folds, first.final])
    final_fit = next(p for p in (tmp_path / "cache" / "fits").iterdir()
                     if json.loads((p / "fit.json").read_text())["name"] == "final")
    shutil.rmtree(final_fit)

    second = train_mnist(**args)
    assert [f.reused for f in second.folds] == [True, True] and not second.final.reused
    for before, after in zip(first.folds, second.folds, strict=True):
        assert after.evaluation == before.evaluation and after.location == before.location
        assert after.curve == before.curve and len(after.curve) == 12  # kept with the fit
    assert second.final.evaluation == first.final.evaluation  # retrained, same seed
    # The first run's three fits shared the cores; the one fit left to train takes them all.
    cores = os.cpu_count() or 1
    assert first.final.threads == fit_threads(min(3, cores))
    assert second.final.threads == cores
    runs = tracking.search_runs([tracking.get_experiment_by_name("tiny-rerun").experiment_id],
                                "tags.mlflow.runName = 'fold-0'")
    assert len(runs) == 2 and {r.data.metrics["accuracy"] for r in runs} == {
        first.folds[0].evaluation.accuracy}
    assert second.to_json()["folds"][0]["reused"] is True
    # A stored model damaged on disk is trained again, not registered as it is.
    damaged = next(path for path in sorted(second.folds[0].model_folder().rglob("*"))
                   if path.is_file())
    damaged.write_bytes(damaged.read_bytes()[:-1])
    third = train_mnist(**args)
    assert [f.reused for f in third.folds] == [False, True] and third.final.reused
    assert third.folds[0].evaluation == first.folds[0].evaluation
    # A changed spec is a different fit: nothing is reused.
    changed = train_mnist(**{**args, "spec": ExperimentSpec(**fields, seed=7)})
    assert not any(f.reused for f in [*changed.folds, changed.final])


def test_invalid_spec_fails_before_training(harness, training_inputs, tracking):
    with pytest.raises(Exception, match="algorithm: unknown 'svm'"):
        train_mnist(ExperimentSpec(algorithm="svm", sources=[training_inputs["source"]]),
                    cache_dir=training_inputs["cache"])
    assert tracking.search_experiments(filter_string="name = 'mnist-digits'") == []


def test_publishing_without_a_final_fit_is_an_error(harness, training_inputs, tracking,
                                                    tmp_path):
    """It used to train, then quietly publish nothing."""
    with pytest.raises(Exception, match=r"publish_to: .* final_fit is false"):
        train_mnist(ExperimentSpec(final_fit=False, sources=[training_inputs["source"]]),
                    publish_to=str(tmp_path / "bundles"), cache_dir=training_inputs["cache"])
    assert tracking.search_experiments(filter_string="name = 'mnist-digits'") == []


def test_a_failed_experiment_is_failed_in_mlflow(harness, training_inputs, tracking, tmp_path):
    """A fit that raises fails the flow run; its hook ends the MLflow parent run as FAILED
    rather than leaving it RUNNING (or, as before, FINISHED by an early exit)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("lgbm:\n  kind: gbdt\n  rounds: 3\n  params: {num_leaves: 1}\n")
    with pytest.raises(Exception, match="num_leaves"):
        train_mnist(ExperimentSpec(limit=600, sources=[training_inputs["source"]],
                          experiment="tiny-broken", augment=AugmentSpec(copies=0)),
                    algorithms_path=str(broken), cache_dir=training_inputs["cache"])
    experiment = tracking.get_experiment_by_name("tiny-broken")
    runs = tracking.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["prefect.flow_run_id"]


def test_a_retried_flow_run_ends_what_its_dead_attempt_left_open(harness, tracking):
    """A process killed outright runs no hook: its parent run stays RUNNING. The next
    attempt of the same flow run ends it as KILLED before starting its own."""
    from prefect import flow

    from mlpaint.training.spec import load_spec
    from tasks.training import start_experiment_run

    uri = os.environ["MLFLOW_TRACKING_URI"]
    experiment = tracking.create_experiment("retried")
    dead = tracking.create_run(experiment, tags={"prefect.flow_run_id": "flow-run-1"})
    other = tracking.create_run(experiment, tags={"prefect.flow_run_id": "flow-run-2"})

    @flow
    def second_attempt() -> str:
        return start_experiment_run(load_spec(), experiment, {}, "fingerprint", uri,
                                    "flow-run-1")

    new = second_attempt()
    assert tracking.get_run(dead.info.run_id).info.status == "KILLED"
    assert tracking.get_run(new).info.status == "RUNNING"
    assert tracking.get_run(other.info.run_id).info.status == "RUNNING"  # not ours


def test_two_cli_runs_at_once_on_embedded_defaults(training_inputs, cli_env, tmp_path):
    """What `make run` does, twice at once in one new folder: no MLFLOW_TRACKING_URI, so
    both create the embedded SQLite store in ./.mlpaint together; both train, register
    and publish, and the store still works afterwards. (Two first opens of a new store
    used to migrate its schema twice at once and break it for good.)"""
    env = {k: v for k, v in cli_env.items() if k != "MLFLOW_TRACKING_URI"}
    mlpaint = os.path.join(os.path.dirname(sys.executable), "mlpaint")
    command = [mlpaint, "train", "--source", training_inputs["source"], "--limit", "600",
               "--algorithms", training_inputs["algorithms"], "--augment-copies", "0",
               "--publish-to", str(tmp_path / "bundles"), "--json"]
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    reports = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-3000:]
        reports.append(json.loads(stdout))
    store = f"sqlite:///{tmp_path / '.mlpaint' / 'mlflow.db'}"
    client = MlflowClient(store, store)
    for report in reports:
        assert client.get_run(report["mlflow_run_id"]).info.status == "FINISHED"
        assert report["publication"] is not None
    versions = {r["registered_model"]["version"] for r in reports}
    assert versions == {"1", "2"}
    # The gates ran one after the other: the registry's champion is what LATEST serves.
    champion = client.get_model_version_by_alias("mnist-digits", "champion")
    served = load_bundle(str(tmp_path / "bundles"), cache_dir=tmp_path / "bundle-cache")
    assert served.info.model_version == str(champion.version)
    # Nothing went to MLflow's process-wide default store (./mlflow.db or ./mlruns).
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_pen_drawings_come_from_the_source_the_cli_names(training_inputs, cli_env, s3_env,
                                                          shared_pendigits, tmp_path):
    """`--pen-source` on S3 (the moto server): the trajectories are fetched from there,
    verified against UCI's pinned hash, drawn, trained on and scored; the run says where
    they came from."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="pen-bucket")
    s3.upload_file(str(shared_pendigits), "pen-bucket", "uci/pendigits-orig.tra")
    source = "s3://pen-bucket/uci/pendigits-orig.tra"
    env = {**cli_env, **s3_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = run_cli(["train", "--source", training_inputs["source"], "--limit", "600",
                      "--algorithms", training_inputs["algorithms"], "--augment-copies", "0",
                      "--pen-source", source, "--json"], env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = json.loads(result.stdout)["drawn"]
    assert drawn["origin"] == source and drawn["verified"] is True
    assert drawn["drawn_writers"] >= 1 and drawn["statistics"]["rows"] == drawn["drawn_rows"]
    assert "% of 3.6 MB" in result.stderr  # fetched from S3, not from the packaged copy


@pytest.mark.slow
def test_cli_train_on_a_local_dask_cluster(training_inputs, cli_env, tmp_path):
    env = {**cli_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    mlpaint = os.path.join(os.path.dirname(sys.executable), "mlpaint")
    process = subprocess.Popen(
        [mlpaint, "train", "--source", training_inputs["source"], "--folds", "2",
         "--limit", "800", "--algorithms", training_inputs["algorithms"], "--features", "raw",
         "--dask-workers", "2", "--no-final-fit", "--cache-dir", str(tmp_path / "cache"),
         "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    report = json.loads(stdout)
    assert [f["name"] for f in report["folds"]] == ["fold-0", "fold-1"]
    assert report["test"] is None and report["registered_model"] is None
    # the folds ran in Dask worker processes, not in the process running the flow
    worker_pids = {int(f["worker"].rsplit(":", 1)[1]) for f in report["folds"]}
    assert process.pid not in worker_pids
    assert MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(report["mlflow_run_id"])


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    """`mlflow server` on SQLite, proxying artifact uploads: a tracking server every machine
    of a cluster can reach."""
    root = tmp_path / "mlflow-server"
    root.mkdir()
    port = free_port()
    server = start_service(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        f"http://127.0.0.1:{port}/health", log=root / "server.log", timeout_s=120)
    yield f"http://127.0.0.1:{port}"
    stop_service(server)


@pytest.fixture
def remote_dask_cluster(tmp_path, s3_env, prefect_api, mlflow_server):
    """A Dask scheduler and one worker, each its own process, the worker set up as if on
    another machine: its own working directory, HOME and cache, no view of the flow's cache
    (nothing tells it where that is), the store in a bucket on the moto S3 endpoint.
    Yields the scheduler's address, the worker's process group and its home."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="mlpaint-store")
    with dask_cluster(tmp_path, {"MLPAINT_STORE": "s3://mlpaint-store/store", **s3_env,
                                 "PREFECT_API_URL": prefect_api,
                                 "MLFLOW_TRACKING_URI": mlflow_server}) as cluster:
        yield cluster


# The one worker does every step on its 2 threads (features, augmentation, pen drawings, both
# fits), each hand-off through the S3 store; on a machine busy with the rest of the suite that
# takes several times as long as alone. This bounds a hang, not a speed.
@pytest.mark.timeout(1500)
@pytest.mark.slow
def test_cli_train_on_a_remote_dask_worker_through_an_s3_store(
        training_inputs, cli_env, s3_env, remote_dask_cluster, mlflow_server, tmp_path,
        monkeypatch):
    """Features, folds and the final fit run in a worker that shares no disk with the flow:
    every hand-off is a URI in the S3 store, which each side resolves through its own cache;
    the MLflow tree and the registered model are complete."""
    import boto3

    address, worker_group, worker_home = remote_dask_cluster
    store = "s3://mlpaint-store/store"
    env = {**cli_env, **s3_env, "MLFLOW_TRACKING_URI": mlflow_server, "MLPAINT_STORE": store}
    completed = run_cli(
        ["train", "--source", training_inputs["source"], "--folds", "2", "--limit", "2000",
         "--algorithms", training_inputs["algorithms"], "--features", "deskew",
         "--augment-copies", "1", "--dask-address", address, "--store", store,
         "--cache-dir", str(tmp_path / "cache"), "--json"], env, timeout=1400)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    assert [f["name"] for f in report["folds"]] == ["fold-0", "fold-1"]
    # Every fit ran in the worker we started (its session's process group), not in the CLI,
    # and its own memory is reported: measured where the fit ran.
    for fit in [*report["folds"], report["test"]]:
        pid = int(fit["worker"].rsplit(":", 1)[1])
        assert os.getpgid(pid) == worker_group, fit["worker"]
        assert 100 < fit["peak_rss_mb"] < 24_000
        assert not fit["reused"]
    # The artefacts are in the bucket, each folder with its manifest; the worker read the
    # tables and wrote features and fits there, and kept its copies in its own cache.
    keys = [item["Key"] for page in boto3.client("s3").get_paginator(
        "list_objects_v2").paginate(Bucket="mlpaint-store", Prefix="store/")
        for item in page.get("Contents", [])]
    areas = {key.split("/")[1] for key in keys}
    assert {"tables", "features", "augmented", "fits"} <= areas, areas
    manifests = [key for key in keys if key.endswith("/manifest.json")]
    assert len([key for key in manifests if key.startswith("store/fits/")]) == 3
    assert list((worker_home / "cache" / "mirror" / "mlpaint-store").iterdir())
    assert not (tmp_path / "cache" / "fits").exists()  # nothing trained into the flow's cache
    # The MLflow tree: the parent, one nested run per fold with its model, and the final
    # model registered, whole (the flow downloaded it from the store to log it).
    client = MlflowClient(mlflow_server)
    parent = client.get_run(report["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.data.tags["mlflow.runName"] for run in children) == ["fold-0", "fold-1"]
    for child in children:
        assert _artifact_paths(client, child.info.run_id, "model")
    version = client.get_model_version("mnist-digits", report["registered_model"]["version"])
    assert version.status == "READY"
    assert parent.data.metrics["test_accuracy"] == pytest.approx(
        report["test"]["statistics"]["accuracy"])
    # The registered model answers pixels with its feature stage inside, as served anywhere.
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    pixels, labels = official_test_digits(training_inputs["source"], 300)
    predicted = np.asarray(mlflow.pyfunc.load_model(
        report["registered_model"]["model_uri"]).predict(pixels.astype(np.float32)))
    assert (predicted.argmax(axis=1) == labels).mean() > 0.8


# Replaces itself with the command (argv[1:]) once SIGINT's disposition is the default again:
# exec keeps a default or ignored disposition as it is.
_EXEC_WITH_DEFAULT_SIGINT = ("import os, signal, sys; "
                             "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                             "os.execv(sys.argv[1], sys.argv[1:])")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_terminated_run_stops_its_fits_at_their_next_round(training_inputs, cli_env,
                                                              tmp_path, stop):
    """SIGTERM (a cancellation from the Prefect UI reaches a run's process as one) or Ctrl-C
    while fits train: each fit stops at its next round and the command ends, its flow run's
    end recorded, instead of the fits' threads training every remaining round first (minutes
    here, more than an hour for a champion's fit)."""
    algorithms = tmp_path / "long.yaml"
    # Rounds enough to keep these fits busy for many minutes.
    algorithms.write_text("lgbm:\n  kind: gbdt\n  rounds: 200000\n  params: {learning_rate: "
                          "0.001, num_leaves: 15, min_data_in_leaf: 10, max_bin: 31}\n")
    env = {**cli_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    mlpaint = os.path.join(os.path.dirname(sys.executable), "mlpaint")
    log = tmp_path / "train.log"
    with log.open("w") as stderr:
        # Started with Ctrl-C's default disposition, as a terminal starts a command: a suite
        # run in the background (a shell's `&` without job control) hands every process it
        # starts SIGINT ignored, and a command that inherits that ignores Ctrl-C on purpose.
        process = subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_DEFAULT_SIGINT, mlpaint, "train", "--source",
             training_inputs["source"], "--limit", "1000", "--algorithms", str(algorithms),
             "--augment-copies", "0", "--folds", "2", "--cache-dir", str(tmp_path / "cache")],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            wait_for(lambda: log.read_text().count(": training lgbm on") >= 2
                     or process.poll() is not None, "the fits to train", timeout_s=300)
            time.sleep(3)
            assert process.poll() is None, log.read_text()[-3000:]
            process.send_signal(stop)
            # Bounds a hang: the fits had nearly all their rounds still to train.
            process.wait(timeout=120)
        finally:
            process.kill()
    text = log.read_text()
    # Ctrl-C: the command's one line and the shell's status for it. SIGTERM: Prefect, once
    # the run's end is recorded, sends it again with Python's default handler back, so the
    # command ends by that signal, as a command without a handler would.
    if stop == signal.SIGINT:
        assert process.returncode == 130, text[-3000:]
        assert text.rstrip().endswith("mlpaint: interrupted"), text[-3000:]
    else:
        assert process.returncode == -signal.SIGTERM, text[-3000:]
    assert "ended CRASHED: MLflow runs" in text  # the flow's end hook ran
    assert "stopped after round" in text, text[-3000:]
    assert "round 200000 of 200000" not in text
