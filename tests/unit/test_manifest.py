"""The one manifest every finished folder carries: written last, checked when read, one error
naming the file at fault."""

import json

import numpy as np
import pytest

from mlpaint.data.dataset import join_split, load_table, save_table
from mlpaint.data.integrity import IntegrityError, sha256_file
from mlpaint.data.pins import Split
from mlpaint.publishing.bundle import BundleIntegrityError, verify_bundle
from mlpaint.storage.manifest import (
    MANIFEST,
    is_whole,
    verify_folder,
    verify_folder_once,
    write_manifest,
)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "artefact"
    (root / "model").mkdir(parents=True)
    (root / "model" / "trees.txt").write_text("tree")
    (root / "scores.json").write_text("{}")
    return root


def test_the_manifest_lists_every_other_file_with_its_hash_and_size(folder):
    assert not is_whole(folder)
    manifest = write_manifest(folder, format_version=7)
    assert is_whole(folder)
    assert manifest == json.loads((folder / MANIFEST).read_text())
    assert manifest["format_version"] == 7
    assert manifest["files"] == {
        "model/trees.txt": {"sha256": sha256_file(folder / "model" / "trees.txt"), "bytes": 4},
        "scores.json": {"sha256": sha256_file(folder / "scores.json"), "bytes": 2}}
    assert verify_folder(folder) == manifest


@pytest.mark.parametrize(("damage", "message"), [
    (lambda f: (f / "model" / "trees.txt").write_text("tre"),
     r"model/trees\.txt: sha256 .* does not match"),
    (lambda f: (f / "scores.json").unlink(), r"scores\.json: missing"),
    (lambda f: (f / MANIFEST).write_text("[1, 2]"), r"unreadable manifest\.json"),
    (lambda f: (f / MANIFEST).unlink(), r"no manifest\.json"),
])
def test_a_damaged_folder_raises_naming_what_is_wrong(folder, damage, message):
    write_manifest(folder)
    damage(folder)
    with pytest.raises(IntegrityError, match=message):
        verify_folder(folder)
    with pytest.raises(IntegrityError, match=message):
        verify_folder_once(folder)


def test_a_manifest_of_bare_hashes_is_read_the_same_way(folder):
    legacy = {"model/trees.txt": sha256_file(folder / "model" / "trees.txt"),
              "scores.json": sha256_file(folder / "scores.json")}
    (folder / MANIFEST).write_text(json.dumps({"files": legacy}))
    verify_folder(folder)
    (folder / "scores.json").write_text("[]")
    with pytest.raises(IntegrityError, match=r"scores\.json: sha256"):
        verify_folder(folder)


def test_a_folder_is_hashed_again_only_when_a_file_changed(folder, monkeypatch):
    import mlpaint.storage.manifest as manifest_module

    write_manifest(folder)
    hashed = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file",
                        lambda path: hashed.append(path.name) or real(path))
    verify_folder_once(folder)
    verify_folder_once(folder)
    assert sorted(hashed) == ["scores.json", "trees.txt"]
    (folder / "scores.json").write_text("[]")
    with pytest.raises(IntegrityError, match=r"scores\.json"):
        verify_folder_once(folder)


def test_a_bundle_error_is_an_integrity_error(folder):
    write_manifest(folder)
    (folder / "scores.json").write_text("[]")
    with pytest.raises(BundleIntegrityError, match=r"scores\.json: sha256") as raised:
        verify_bundle(folder)
    assert isinstance(raised.value, IntegrityError)


def test_a_cached_table_is_checked_when_loaded(tmp_path):
    rng = np.random.default_rng(0)
    table = join_split(Split.TEST, rng.integers(0, 256, (5, 28, 28), np.uint8),
                       rng.integers(0, 10, 5).astype(np.uint8), origin="generated",
                       inputs_sha256={}, verified=False)
    folder = save_table(table, tmp_path / "table")
    assert is_whole(folder)
    np.testing.assert_array_equal(load_table(folder).labels, table.labels)
    labels = np.load(folder / "labels.npy")
    np.save(folder / "labels.npy", (labels + 1) % 10)
    with pytest.raises(IntegrityError, match=r"labels\.npy: sha256"):
        load_table(folder)


def test_the_gates_drawn_set_is_kept_whole_and_checked(tmp_path):
    from mlpaint.data.pendigits import PenDigit, PenTable
    from mlpaint.publishing.champion import drawn_set

    stroke = np.array([[100, 400], [300, 400], [200, 50]])
    table = PenTable.from_digits(
        [PenDigit(label=7, writer=writer, sample=sample, strokes=(stroke + 10 * sample,))
         for writer in (1, 2) for sample in range(3)], origin="test", sha256="0" * 64,
        verified=False)
    drawn = drawn_set(table, frozenset({2}), tmp_path)
    (kept,) = (tmp_path / "drawn-sets").iterdir()
    assert is_whole(kept) and drawn.pixels.shape == (3, 784) and set(drawn.writers) == {2}
    again = drawn_set(table, frozenset({2}), tmp_path)
    assert np.array_equal(again.pixels, drawn.pixels)
    assert np.array_equal(again.labels, drawn.labels)
    damaged = bytearray((kept / "pixels.npy").read_bytes())
    damaged[-1] ^= 0xFF  # one pixel changed, the size kept
    (kept / "pixels.npy").write_bytes(bytes(damaged))
    with pytest.raises(IntegrityError, match=r"pixels\.npy: sha256"):
        drawn_set(table, frozenset({2}), tmp_path)
