"""Registering a run's model is idempotent on a real SQLite MLflow store: `log-final-model`
retries after a failure halfway, and a retry must not leave the registry with two versions
of one run (the gate and `LATEST` would then disagree about which one the run made)."""

import numpy as np
import pytest
from mlflow import MlflowClient

from mlpaint.tracking import REGISTERED_MODEL_NAME, ensure_experiment, log_digit_model
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
