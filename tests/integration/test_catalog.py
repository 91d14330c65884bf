"""The catalog's finished folders on a local store and on an S3 prefix (the moto server):
written whole with a manifest, read through each machine's own verified copy."""

import json

import boto3
import numpy as np
import pytest

from mlpaint.data.integrity import IntegrityError
from mlpaint.storage.catalog import MANIFEST, Catalog, local_folder, mirror_folder

pytestmark = pytest.mark.integration


@pytest.fixture(params=["folder", "s3"])
def catalog(request, tmp_path, monkeypatch):
    monkeypatch.setenv("MLPAINT_CACHE_DIR", str(tmp_path / "writer-cache"))
    if request.param == "folder":
        return Catalog.from_settings(str(tmp_path / "store"), tmp_path / "writer-cache")
    request.getfixturevalue("s3_env")
    boto3.client("s3").create_bucket(Bucket="catalog-test")
    return Catalog.from_settings("s3://catalog-test/runs", tmp_path / "writer-cache")


def _write(catalog: Catalog, key: str, values: np.ndarray) -> str:
    location = catalog.location("features", key)
    with catalog.staging(location) as staging:
        np.save(staging / "features.npy", values)
        (staging / "model").mkdir()
        (staging / "model" / "trees.txt").write_text("tree")
        assert not catalog.is_finished(location)  # nothing is there until `finish`
        catalog.finish(staging, location)
    return location


def test_a_finished_folder_is_read_back_whole_on_another_machine(catalog, tmp_path,
                                                                 monkeypatch):
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    location = _write(catalog, "abc", values)
    assert catalog.is_finished(location)
    manifest = json.loads((local_folder(location) / MANIFEST).read_text())
    assert set(manifest["files"]) == {"features.npy", "model/trees.txt"}
    # A reader with a cache of its own (another machine) gets a verified copy.
    monkeypatch.setenv("MLPAINT_CACHE_DIR", str(tmp_path / "reader-cache"))
    folder = local_folder(location)
    assert np.array_equal(np.load(folder / "features.npy"), values)
    assert (folder / "model" / "trees.txt").read_text() == "tree"
    if catalog.remote:
        assert folder == mirror_folder(location)
        assert folder.is_relative_to(tmp_path / "reader-cache")


def test_a_damaged_file_is_named_not_read(catalog, tmp_path, monkeypatch):
    location = _write(catalog, "def", np.ones(5, np.float32))
    local_folder(location)  # verified once, then damaged: the change is noticed
    copy = mirror_folder(location) if catalog.remote else local_folder(location)
    (copy / "model" / "trees.txt").write_text("tre")
    if catalog.remote:  # a damaged local copy is downloaded again
        assert (local_folder(location) / "model" / "trees.txt").read_text() == "tree"
        boto3.client("s3").put_object(Bucket="catalog-test",
                                      Key="runs/features/def/model/trees.txt", Body=b"tre")
        monkeypatch.setenv("MLPAINT_CACHE_DIR", str(tmp_path / "third-cache"))
    with pytest.raises(IntegrityError, match=r"trees\.txt: sha256 .* does not match"):
        local_folder(location)
    catalog.remove(location)
    assert not catalog.is_finished(location)


def test_the_writer_reads_what_it_finished_without_hashing_it_again(catalog, monkeypatch):
    import mlpaint.storage.manifest as manifest_module

    hashed = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file",
                        lambda path: hashed.append(path.name) or real(path))
    location = _write(catalog, "ghi", np.ones(5, np.float32))
    assert sorted(hashed) == ["features.npy", "trees.txt"]  # once, to write the manifest
    folder = local_folder(location)
    assert sorted(hashed) == ["features.npy", "trees.txt"]
    (folder / "model" / "trees.txt").write_text("tre")  # changed since: hashed again
    if catalog.remote:  # the damaged local copy is downloaded again
        assert (local_folder(location) / "model" / "trees.txt").read_text() == "tree"
    else:
        with pytest.raises(IntegrityError, match=r"trees\.txt: sha256 .* does not match"):
            local_folder(location)


def test_tables_are_shared_by_uri_only_when_the_store_cannot_see_them(catalog, tmp_path):
    table = tmp_path / "writer-cache" / "tables" / "0123" / "train"
    table.mkdir(parents=True)
    (table / "meta.json").write_text("{}")
    shared = catalog.share_folder(table, "tables")
    assert shared == catalog.location("tables", "0123/train")
    assert json.loads((local_folder(shared) / "meta.json").read_text()) == {}
    # Inside a local store, a folder is its own URI: nothing is copied.
    inside = Catalog.from_settings(str(tmp_path / "writer-cache"), tmp_path / "writer-cache")
    assert inside.share_folder(table, "tables") == str(table)


def test_features_stored_by_older_stage_code_are_made_again(catalog, tmp_path, monkeypatch):
    """A stored feature matrix is keyed by the stage code's version too: after a stage's
    output changes (and its version is bumped), training computes the matrix again instead
    of reading one that serving's code would no longer produce."""
    from prefect.logging import disable_run_logger

    import mlpaint.training.keys as keys
    import tasks.training as training
    from mlpaint.data.dataset import join_split, save_table
    from mlpaint.data.pins import Split
    from mlpaint.model.features import FeatureStage

    rng = np.random.default_rng(0)
    table = save_table(join_split(Split.TRAIN, rng.integers(0, 256, (6, 28, 28), np.uint8),
                                  np.arange(6, dtype=np.uint8), origin="test",
                                  inputs_sha256={}, verified=True),
                       tmp_path / "tables" / "0123" / "train")
    with disable_run_logger():
        now = training.prepare_features.fn(str(table), FeatureStage.DESKEW, None, catalog)
        assert training.prepare_features.fn(str(table), FeatureStage.DESKEW, None,
                                            catalog).folder == now.folder  # reused
        monkeypatch.setattr(keys, "FEATURE_CODE_VERSION", "0")
        older = training.prepare_features.fn(str(table), FeatureStage.DESKEW, None, catalog)
    assert older.folder != now.folder
    assert catalog.is_finished(older.folder) and catalog.is_finished(now.folder)
