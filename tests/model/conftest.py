"""The model the behaviour tests check: the one a real training run registers. `mlpaint
train` runs the packaged default spec (its features, augmentation, pen drawings and
LightGBM configuration) on the first 8,000 MNIST training digits against a real Prefect
server and a SQLite MLflow store, and the tests load the registered version back from the
registry, as `mlpaint publish` and MLflow's scoring server do. It runs without the spec's
folds: they only score the configuration on held-out rows, and the registered model is the
final fit on every row either way."""

import json
import os

import mlflow
import numpy as np
import pytest

from tests.conftest import run_cli

TRAIN_ROWS = 8000


class RegisteredModel:
    """A registered version, loaded through MLflow: raw 0-255 pixels in, digits out."""

    def __init__(self, model_uri: str, tracking_uri: str) -> None:
        self.model_uri = model_uri
        # The store through the environment, for this load only: mlflow.set_tracking_uri
        # would point every later test's MLflow calls at this store.
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
            patch.setenv("MLFLOW_REGISTRY_URI", tracking_uri)
            self.pyfunc = mlflow.pyfunc.load_model(model_uri)

    def digits(self, images: np.ndarray) -> np.ndarray:
        pixels = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
        return np.asarray(self.pyfunc.predict(pixels)).argmax(axis=1)


@pytest.fixture(scope="session")
def registered_model(shared_mnist, prefect_api, tmp_path_factory) -> RegisteredModel:
    root = tmp_path_factory.mktemp("registered-model")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api,
           "PREFECT_HOME": str(root / "prefect-client"), "MLFLOW_TRACKING_URI": tracking_uri,
           "MLPAINT_CACHE_DIR": str(root / "cache")}
    trained = run_cli(["train", "--source", str(shared_mnist), "--limit", str(TRAIN_ROWS),
                       "--folds", "none", "--json"], env, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    registered = json.loads(trained.stdout)["registered_model"]
    assert registered and registered["version"] == "1", trained.stdout
    return RegisteredModel(registered["model_uri"], tracking_uri)

