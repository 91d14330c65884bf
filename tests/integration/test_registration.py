"""Registering a run's model on a real SQLite MLflow store. It is idempotent: `log-final-model`
retries after a failure halfway, and a retry must not leave the registry with two versions
of one run (the gate and `LATEST` would then disagree about which one the run made). And it
is logged as code, so it loads where pickled models are refused."""

from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.models import Model

from mlpaint.tracking import REGISTERED_MODEL_NAME, ensure_experiment, log_digit_model
from mlpaint.tracking.publication import load_registered_model
from mlpaint.tracking.registry import _log_pyfunc
from mlpaint.training.algorithms import DigitModel, GbdtConfig, train_model

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    return client, ensure_experiment(client, "registration", uri)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(200, 784)).astype(np.float32)
    labels = np.arange(200) % 10
    model = train_model("lgbm", GbdtConfig(rounds=2, params={"num_leaves": 4}), pixels, labels,
                        feature_stage="raw", seed=0, num_threads=1)
    return model.save(tmp_path_factory.mktemp("model") / "model")


def _versions(client, run_id: str) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"run_id = '{run_id}'"))


def test_registering_a_run_twice_returns_its_first_version(store, model_dir):
    client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    pixels = np.zeros((2, 784), np.float32)
    first = log_digit_model(client, run_id, model_dir, pixels)
    again = log_digit_model(client, run_id, model_dir, pixels)
    assert again == first
    assert _versions(client, run_id) == [first.version]
    other_run = client.create_run(experiment).info.run_id
    assert log_digit_model(client, other_run, model_dir, pixels).version != first.version


def test_a_retry_registers_the_model_its_failed_try_had_logged(store, model_dir):
    """The first try logged the model and died before registering it: the retry registers
    that logged model rather than logging a second copy."""
    client, experiment = store
    run = client.create_run(experiment)
    logged = _log_pyfunc(client, run, model_dir, np.zeros((2, 784), np.float32),
                         DigitModel.load(model_dir).card())
    registered = log_digit_model(client, run.info.run_id, model_dir,
                                 np.zeros((2, 784), np.float32))
    version = client.get_model_version(REGISTERED_MODEL_NAME, registered.version)
    assert version.source == logged.artifact_location
    models = client.search_logged_models([experiment],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.model_id for m in models] == [logged.model_id]


def test_the_registered_model_is_code_and_loads_with_pickle_refused(store, model_dir, tmp_path,
                                                                     monkeypatch):
    """No pickled object in the logged model: its MLmodel names the code file that sets it,
    and with MLflow told to refuse pickle both the pyfunc and mlpaint's own loader read it
    and answer as the saved DigitModel does."""
    client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 784)).astype(np.float32)
    registered = log_digit_model(client, run_id, model_dir, pixels[:2])
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(REGISTERED_MODEL_NAME,
                                                           registered.version),
        dst_path=str(tmp_path), tracking_uri=client.tracking_uri))
    files = {path.name for path in local.rglob("*")}
    assert "python_model.pkl" not in files and "pyfunc_code.py" in files
    assert Model.load(local).flavors["python_function"]["model_code_path"].endswith(
        "pyfunc_code.py")
    assert client.get_logged_model(registered.model_id).artifact_location == \
        client.get_model_version(REGISTERED_MODEL_NAME, registered.version).source

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    expected = DigitModel.load(model_dir).predict_pixels(pixels)
    loaded = mlflow.pyfunc.load_model(str(local))
    assert np.allclose(loaded.predict(pixels), expected, atol=1e-6)
    model = load_registered_model(REGISTERED_MODEL_NAME, registered.version,
                                  client.tracking_uri)
    assert np.allclose(model.predict_pixels(pixels), expected)
