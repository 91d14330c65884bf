"""Publishing on real services: a SQLite MLflow registry, Prefect's test harness, the moto S3
server, and a publishing subprocess killed between upload and pointer flip."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import boto3
import numpy as np
import pytest
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows import cli as flows_cli
from flows.publish import publish_model
from mlpaint.data.dataset import table_from_files
from mlpaint.data.fetch import FetchContext, fetch_dataset
from mlpaint.data.integrity import BlobCache, Pins
from mlpaint.publishing.bundle import (
    BundleIntegrityError,
    load_bundle,
    read_latest,
)
from mlpaint.publishing.spec import PublishSpec
from mlpaint.storage.stores import S3Store, store_for
from mlpaint.tracking import ensure_experiment, log_digit_model
from mlpaint.training.algorithms import DigitModel, GbdtConfig, train_model
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def registry(tmp_path_factory, shared_mnist):
    """A SQLite registry holding three versions of mnist-digits of known relative quality:
    v1 good, v2 worse, v3 the same booster as v1 (equal)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cache = root / "cache"
    fetched = fetch_dataset([str(shared_mnist)], FetchContext(Pins(), BlobCache(cache)))
    train = table_from_files(fetched[next(s for s in fetched if s.value == "train")])
    pixels, labels = train.pixels[:3000], train.labels[:3000]
    features = pixels.astype(np.float32)  # the raw stage
    params = {"num_leaves": 15, "min_data_in_leaf": 10, "learning_rate": 0.3, "max_bin": 31}
    good = train_model("lgbm", GbdtConfig(rounds=15, params=params), features, labels,
                       feature_stage="raw", seed=0, num_threads=2)
    worse = train_model("lgbm", GbdtConfig(rounds=2, params=params), features[:300],
                        labels[:300], feature_stage="raw", seed=0, num_threads=2)
    client = MlflowClient(uri, uri)
    experiment = ensure_experiment(client, "publish-registry", uri)
    for index, model in enumerate((good, worse, good)):
        run = client.create_run(experiment)
        log_digit_model(client, run.info.run_id, model.save(root / f"model-{index}"),
                        pixels[:2])
        client.set_terminated(run.info.run_id)
    return {"uri": uri, "root": root, "cache": str(cache), "source": str(shared_mnist)}


def _publish(registry, monkeypatch, **kwargs):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    return publish_model(PublishSpec(sources=[registry["source"]], gallery_per_digit=5,
                                     **kwargs), cache_dir=registry["cache"])


def test_gate_better_worse_equal_forced(harness, registry, monkeypatch, tmp_path, capsys):
    client = MlflowClient(registry["uri"], registry["uri"])
    dest = str(tmp_path / "bundles")

    first = _publish(registry, monkeypatch, model_version="1", to=dest)
    assert first.decision.alias == "champion" and first.decision.reason == "no champion yet"
    assert str(client.get_model_version_by_alias("mnist-digits", "champion").version) == "1"
    latest_after_first = read_latest(load_store(dest))
    assert latest_after_first == first.bundle.version

    worse = _publish(registry, monkeypatch, model_version="2", to=dest)
    assert worse.decision.alias == "challenger" and not worse.decision.promote
    assert worse.decision.champion_accuracy > worse.decision.candidate_accuracy
    assert str(client.get_model_version_by_alias("mnist-digits", "challenger").version) == "2"
    assert str(client.get_model_version_by_alias("mnist-digits", "champion").version) == "1"
    assert read_latest(load_store(dest)) == latest_after_first  # LATEST untouched
    run = client.get_run(client.get_model_version("mnist-digits", "2").run_id)
    assert "worse by more than the margin" in run.data.tags["mlpaint.gate_reason"]
    # The two models side by side on the same test digits: what the gate scored each
    # model's accuracy on, so the split accounts for the gap between them to the digit.
    paired = worse.decision.paired
    assert paired.rows == 10_000 and "sign test p = " in worse.decision.reason
    assert (paired.right_only_second - paired.right_only_first) / paired.rows == pytest.approx(
        worse.decision.candidate_accuracy - worse.decision.champion_accuracy, abs=1e-12)

    # ...and on the same pen drawings: these runs drew none, so every writer is unseen.
    drawn = worse.decision.drawn
    assert (drawn.rows, drawn.writers) == (7494, 30)
    assert drawn.champion_accuracy > drawn.candidate_accuracy
    assert "on 7494 pen drawings of 30 writers neither trained on: worse" in \
        worse.decision.reason

    equal = _publish(registry, monkeypatch, model_version="3", to=dest)
    assert equal.decision.alias == "champion"
    assert equal.decision.drawn.candidate_accuracy == equal.decision.drawn.champion_accuracy
    assert equal.decision.candidate_accuracy == pytest.approx(equal.decision.champion_accuracy)
    assert (equal.decision.paired.right_only_first, equal.decision.paired.right_only_second,
            equal.decision.paired.p_value) == (0, 0, 1.0)  # the same booster
    assert read_latest(load_store(dest)) == equal.bundle.version

    forced = _publish(registry, monkeypatch, model_version="2", to=dest, force=True)
    assert forced.decision.alias == "champion" and forced.decision.forced
    assert str(client.get_model_version_by_alias("mnist-digits", "champion").version) == "2"
    # the champion alias resolves to the bundle it was published to
    loaded = load_bundle("models:/mnist-digits@champion")
    assert loaded.info.model_version == "2" and loaded.info.version == forced.bundle.version
    artifacts = {a.path for a in client.list_artifacts(forced.run_id, "explanations")}
    assert "explanations/mean_contributions.png" in artifacts

    # What served when, newest first: the forced promotion, the equal one, the first.
    history = _cli_json(["history", "--to", dest, "--json"], capsys)
    assert history["latest"] == forced.bundle.version
    moves = [(e["action"], e["bundle_version"], e["previous"], e["forced"], e["model_version"])
             for e in history["history"]]
    assert moves == [
        ("publish", forced.bundle.version, equal.bundle.version, True, "2"),
        ("publish", equal.bundle.version, first.bundle.version, False, "3"),
        ("publish", first.bundle.version, None, False, "1")]
    assert history["history"][2]["reason"] == "no champion yet"
    assert history["history"][0]["reason"] == forced.decision.reason
    assert all(e["by"].startswith("flow run ") for e in history["history"])

    # Undo the forced promotion: LATEST and the alias go back together; nothing is built.
    kept = sorted(p.name for p in (tmp_path / "bundles" / "versions").iterdir())
    undone = _cli_json(["rollback", "--to", dest, "--reason", "bad promotion", "--json"],
                       capsys)
    assert (undone["bundle_version"], undone["previous"], undone["champion_alias"]) == (
        equal.bundle.version, forced.bundle.version, "3")
    assert read_latest(load_store(dest)) == equal.bundle.version
    assert str(client.get_model_version_by_alias("mnist-digits", "champion").version) == "3"
    assert sorted(p.name for p in (tmp_path / "bundles" / "versions").iterdir()) == kept
    again = _cli_json(["rollback", "--to", dest, "--bundle-version", forced.bundle.version,
                       "--json"], capsys)
    assert again["champion_alias"] == "2"
    assert str(client.get_model_version_by_alias("mnist-digits", "champion").version) == "2"
    latest_moves = _cli_json(["history", "--to", dest, "--json"], capsys)["history"]
    assert [(e["action"], e["reason"]) for e in latest_moves[:2]] == [
        ("rollback", f"rolled back from {equal.bundle.version}"),
        ("rollback", "bad promotion")]
    assert flows_cli.main(["rollback", "--to", dest, "--bundle-version", "20990101T000000Z-v9"
                           ]) == 1
    assert "no whole bundle 20990101T000000Z-v9 is kept" in capsys.readouterr().err


def _cli_json(args: list[str], capsys) -> dict:
    """`mlpaint ARGS` in this process (history and rollback need no Prefect), its JSON."""
    capsys.readouterr()
    assert flows_cli.main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def load_store(dest):
    return store_for(dest)


def test_killed_publisher_leaves_the_previous_bundle(harness, registry, monkeypatch,
                                                     tmp_path, prefect_api):
    dest = tmp_path / "bundles"
    first = _publish(registry, monkeypatch, model_version="1", to=str(dest), force=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "PREFECT_API_URL": prefect_api,
           "PREFECT_HOME": str(tmp_path / "prefect-client"),
           "MLPAINT_FAULT_PAUSE_BEFORE_POINTER": "120"}
    mlpaint = os.path.join(os.path.dirname(sys.executable), "mlpaint")
    process = subprocess.Popen(
        [mlpaint, "publish", "--model-version", "3", "--to", str(dest), "--force",
         "--gallery-per-digit", "5", "--source", registry["source"], "--cache-dir",
         registry["cache"]], env=env, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def uploaded() -> list[Path]:
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            return list((dest / "versions").glob("*-v3/manifest.json"))

        wait_for(uploaded, "the publisher to finish uploading", timeout_s=300, interval_s=0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert (dest / "LATEST").read_text().strip() == first.bundle.version
    loaded = load_bundle(str(dest))
    assert loaded.info.version == first.bundle.version and loaded.info.model_version == "1"


def _loaded_version(uri: str, cache_dir: str) -> str:
    return load_bundle(uri, cache_dir=Path(cache_dir)).info.version


def test_s3_destination(s3_env, tmp_path, registry, harness, monkeypatch):
    boto3.client("s3").create_bucket(Bucket="bundles")
    report = _publish(registry, monkeypatch, model_version="1", to="s3://bundles/mnist",
                      force=True)
    store = S3Store("bundles", "mnist")
    assert read_latest(store) == report.bundle.version
    loaded = load_bundle("s3://bundles/mnist", cache_dir=tmp_path / "cache")
    assert loaded.info.version == report.bundle.version
    assert loaded.model().raw_scores(np.zeros((1, 784), np.float32)).shape == (1, 10)
    # processes loading the same version into one cache at once (server workers) all succeed
    shared_cache = tmp_path / "shared-cache"
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        versions = list(pool.map(_loaded_version, ["s3://bundles/mnist"] * 4,
                                 [str(shared_cache)] * 4))
    assert versions == [report.bundle.version] * 4
    assert not list(shared_cache.rglob("*.partial-*"))
    # a tampered object in the bucket is caught on load
    key = f"mnist/versions/{report.bundle.version}/bundle.json"
    s3 = boto3.client("s3")
    body = json.loads(s3.get_object(Bucket="bundles", Key=key)["Body"].read())
    body["metrics"]["test_accuracy"] = 1.0
    s3.put_object(Bucket="bundles", Key=key, Body=json.dumps(body).encode())
    with pytest.raises(BundleIntegrityError, match=r"bundle\.json: sha256"):
        load_bundle("s3://bundles/mnist", cache_dir=tmp_path / "cache2")


def test_history_and_rollback_on_s3(s3_env, tmp_path, registry, harness, monkeypatch):
    from mlpaint.publishing.bundle import latest_history
    from mlpaint.publishing.rollback import RollbackError, rollback

    boto3.client("s3").create_bucket(Bucket="history")
    first = _publish(registry, monkeypatch, model_version="1", to="s3://history/app",
                     force=True)
    second = _publish(registry, monkeypatch, model_version="3", to="s3://history/app",
                      force=True)
    store = S3Store("history", "app")
    assert [(e.bundle_version, e.previous) for e in latest_history(store)] == [
        (first.bundle.version, None), (second.bundle.version, first.bundle.version)]
    client = MlflowClient(registry["uri"], registry["uri"])
    result = rollback("s3://history/app", bundle_version=None, reason="", by="test",
                      tracking_client=client)
    assert (result.entry.bundle_version, result.champion_alias) == (first.bundle.version, "1")
    assert read_latest(store) == first.bundle.version
    assert load_bundle("s3://history/app", cache_dir=tmp_path / "cache").info.model_version == "1"
    with pytest.raises(RollbackError, match="already names"):
        rollback("s3://history/app", bundle_version=first.bundle.version, reason="", by="test")


def test_a_version_from_an_unfinished_experiment_is_never_published(harness, registry,
                                                                     monkeypatch, tmp_path):
    """Registered by a run whose folds never all finished (tag still `incomplete`): refused
    when named, skipped when publishing picks the newest."""
    from mlpaint.tracking.publication import IncompleteModelError

    client = MlflowClient(registry["uri"], registry["uri"])
    run = client.create_run(client.get_experiment_by_name("publish-registry").experiment_id)
    model = DigitModel.load(registry["root"] / "model-0")
    folder = model.save(tmp_path / "unfinished")
    pixels = np.zeros((2, 784), np.uint8)
    version = log_digit_model(client, run.info.run_id, folder, pixels, complete=False).version
    client.set_terminated(run.info.run_id, status="FAILED")
    with pytest.raises(IncompleteModelError, match="did not finish every fit"):
        _publish(registry, monkeypatch, model_version=version, to=str(tmp_path / "b1"))
    newest = _publish(registry, monkeypatch, to=str(tmp_path / "b2"))
    assert newest.model_version != version


def test_two_publishers_at_once_leave_the_alias_and_latest_agreeing(harness, registry,
                                                                    monkeypatch, tmp_path,
                                                                    prefect_api):
    """The gate's read-compare-flip is one critical section per destination. The first
    publisher (version 3, as good as the champion) pauses inside it, between uploading its
    bundle and moving LATEST; a second (version 2, forced) arrives meanwhile and waits. It
    then reads the champion the first one made, and the alias and LATEST end naming the
    same version."""
    client = MlflowClient(registry["uri"], registry["uri"])
    dest = tmp_path / "bundles"
    _publish(registry, monkeypatch, model_version="1", to=str(dest), force=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "PREFECT_API_URL": prefect_api,
           "PREFECT_HOME": str(tmp_path / "prefect-client"),
           "PREFECT_LOGGING_EXTRA_LOGGERS": "mlpaint"}
    mlpaint = os.path.join(os.path.dirname(sys.executable), "mlpaint")

    def publisher(version: str, *extra: str, pause: str = "0") -> subprocess.Popen:
        return subprocess.Popen(
            [mlpaint, "publish", "--model-version", version, "--to", str(dest), "--json",
             "--gallery-per-digit", "5", "--source", registry["source"], "--cache-dir",
             registry["cache"], *extra],
            env={**env, "MLPAINT_FAULT_PAUSE_BEFORE_POINTER": pause}, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = publisher("3", pause="45")
    def uploaded() -> list[Path]:
        assert first.poll() is None, first.communicate()
        return list((dest / "versions").glob("*-v3/manifest.json"))

    wait_for(uploaded, "the first publisher to finish uploading", timeout_s=300,
             interval_s=0.5)
    second = publisher("2", "--force")
    reports = []
    for process in (first, second):
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        reports.append((json.loads(stdout.strip().splitlines()[-1]), stderr))
    (first_report, _), (second_report, second_log) = reports
    assert first_report["gate"]["alias"] == "champion"
    assert "held by another process; waiting" in second_log
    assert second_report["gate"]["champion_version"] == "3"  # read after the first's flip
    champion = client.get_model_version_by_alias("mnist-digits", "champion")
    latest = load_bundle(str(dest), cache_dir=tmp_path / "cache")
    assert str(champion.version) == latest.info.model_version == "2"
    assert latest.info.version == second_report["bundle"]["version"]


def test_a_rerun_reuses_the_built_bundle_and_leaves_no_work_area(harness, registry,
                                                                 monkeypatch, tmp_path):
    """Explaining the test set is publishing's expensive step: a rerun of a publication
    (a retry after the gate or the upload failed) takes the bundle its first attempt built,
    the very bundle (same version id, which holds its build time). Each run's work area is
    gone when it ends."""
    dest = str(tmp_path / "bundles")
    work = Path(registry["cache"]) / "work"
    left_before = set(work.iterdir()) if work.exists() else set()  # by a killed publisher
    first = _publish(registry, monkeypatch, model_version="1", to=dest, force=True)
    again = _publish(registry, monkeypatch, model_version="1", to=dest, force=True)
    assert again.bundle.version == first.bundle.version
    other = _publish(registry, monkeypatch, model_version="3", to=dest, force=True)
    assert other.bundle.version != first.bundle.version  # another model, built anew
    assert set(work.iterdir()) == left_before


def test_without_a_champion_in_the_registry_the_served_bundle_is_the_one_to_beat(
        harness, registry, monkeypatch, tmp_path):
    """A registry naming no champion (a new MLflow store, or the alias removed) publishing to a
    destination that already serves a model: the gate scores the served bundle, so a worse
    candidate is not served in its place."""
    client = MlflowClient(registry["uri"], registry["uri"])
    dest = str(tmp_path / "bundles")
    aliases_before = dict(client.get_registered_model("mnist-digits").aliases)
    served = _publish(registry, monkeypatch, model_version="1", to=dest, force=True)
    assert read_latest(store_for(dest)) == served.bundle.version
    client.delete_registered_model_alias("mnist-digits", "champion")
    try:
        worse = _publish(registry, monkeypatch, model_version="2", to=dest)
        assert not worse.decision.promote and worse.decision.alias == "challenger"
        assert f"the served bundle {served.bundle.version}" in worse.decision.reason
        assert worse.decision.champion_accuracy > worse.decision.candidate_accuracy
        assert read_latest(store_for(dest)) == served.bundle.version  # LATEST untouched
    finally:
        for alias in client.get_registered_model("mnist-digits").aliases:
            client.delete_registered_model_alias("mnist-digits", alias)
        for alias, version in aliases_before.items():
            client.set_registered_model_alias("mnist-digits", alias, version)
