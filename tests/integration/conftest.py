"""A real small bundle for the serving tests: LightGBM trained on 8,000 real MNIST digits,
explained and published exactly as `mlpaint publish` does, minus the registry."""

from __future__ import annotations

import numpy as np
import pytest

from mlpaint.data.dataset import row_keys, table_from_files
from mlpaint.data.fetch import FetchContext, fetch_dataset
from mlpaint.data.integrity import BlobCache, Pins
from mlpaint.data.pins import Split
from mlpaint.model.features import apply_feature_stage
from mlpaint.publishing.build import build_bundle_folder, explain_test_set
from mlpaint.publishing.bundle import publish_bundle
from mlpaint.storage.stores import LocalStore
from mlpaint.training.algorithms import GbdtConfig, train_model

STAGE = "moments"  # the default spec's


@pytest.fixture(scope="session")
def mnist_tables(shared_mnist, tmp_path_factory):
    cache = tmp_path_factory.mktemp("serving-cache")
    fetched = fetch_dataset([str(shared_mnist)], FetchContext(Pins(), BlobCache(cache)))
    return {split: table_from_files(files) for split, files in fetched.items()}


@pytest.fixture(scope="session")
def small_model(mnist_tables):
    train = mnist_tables[Split.TRAIN]
    features = apply_feature_stage(STAGE, train.pixels[:8000])
    config = GbdtConfig(rounds=30, params={"num_leaves": 31, "learning_rate": 0.3,
                                           "feature_fraction": 0.5, "max_bin": 63})
    return train_model("lgbm", config, features, train.labels[:8000], feature_stage=STAGE,
                       seed=0, num_threads=1)


def build_and_publish(model, mnist_tables, root, version, *, promote=True, rows=1000):
    test = mnist_tables[Split.TEST]
    pixels, labels = np.asarray(test.pixels[:rows]), test.labels[:rows]
    explanations = explain_test_set(model, apply_feature_stage(STAGE, pixels), pixels, labels,
                                    test.row_hash[:rows], row_keys(Split.TEST, rows),
                                    per_digit=8)
    staging = root / f"staging-{version}"
    build_bundle_folder(staging, model, explanations, model_name="mnist-digits",
                        model_version=version, run_id="local",
                        metrics={"test_accuracy": explanations.test_accuracy},
                        data_fingerprint={"dataset": "test"})
    bundle_version = f"2026010{version}T000000Z-v{version}"
    publish_bundle(staging, LocalStore(root / "bundles"), bundle_version, promote=promote,
                   retention=5)
    return bundle_version


@pytest.fixture(scope="session")
def bundle_root(small_model, mnist_tables, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    build_and_publish(small_model, mnist_tables, root, "1")
    return root
