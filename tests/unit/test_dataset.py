import numpy as np
import pytest

from mlpaint.data.dataset import (
    LABEL_COLUMN,
    join_split,
    load_table,
    row_hashes,
    row_keys,
    save_table,
)
from mlpaint.data.formats import DataFormatError
from mlpaint.data.pins import Split


def _join(images, labels):
    return join_split(Split.TRAIN, images, labels, origin="test", inputs_sha256={},
                      verified=True, images_name="imgs", labels_name="lbls")


def test_join_builds_a_checked_table():
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    images[2, 0, 1] = 9
    table = _join(images, np.array([0, 1, 2, 9], dtype=np.uint8))
    assert table.pixels.shape == (4, 784)
    assert table.pixels[2, 1] == 9
    assert table.label_counts() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    frame = table.to_frame()
    assert list(frame.columns[:2]) == ["pixel_0", "pixel_1"]
    assert frame.shape == (4, 785) and frame[LABEL_COLUMN].tolist() == [0, 1, 2, 9]
    assert frame.index[3] == "train-00003"


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8), "lbls: count mismatch: 2"),
        (np.zeros((2, 28, 28), np.uint8), np.array([1, 10], np.uint8),
         "lbls: label 10 at row 1 is outside 0..9"),
        (np.zeros((2, 28, 28), np.float32), np.zeros(2, np.uint8), "imgs: pixels must be uint8"),
        (np.zeros((2, 27, 28), np.uint8), np.zeros(2, np.uint8), "imgs: images must be N x 28"),
        (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8), "no rows"),
    ],
)
def test_join_rejects_bad_inputs(images, labels, message):
    with pytest.raises(DataFormatError, match=message):
        _join(images, labels)


def test_row_hash_is_stable_across_runs_and_machines():
    keys = row_keys(Split.TRAIN, 3)
    assert keys == ["train-00000", "train-00001", "train-00002"]
    hashes = row_hashes(keys)
    assert hashes.dtype == np.uint64
    # Pinned: blake2b-64 of the key, little-endian. A change here reshuffles every fold.
    assert int(hashes[0]) == int.from_bytes(
        __import__("hashlib").blake2b(b"train-00000", digest_size=8).digest(), "little")
    assert np.array_equal(hashes, row_hashes(keys))
    fold_sizes = np.bincount(row_hashes(row_keys(Split.TRAIN, 5000)) % np.uint64(5))
    assert fold_sizes.min() > 900  # roughly even, like MLDB's rowHash() % 5


def test_save_and_load_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    table = _join(images, np.arange(5, dtype=np.uint8))
    folder = save_table(table, tmp_path / "t")
    loaded = load_table(folder)
    assert np.array_equal(loaded.pixels, table.pixels)
    assert np.array_equal(loaded.row_hash, table.row_hash)
    assert loaded.meta == table.meta
    assert not (tmp_path / ".t.partial").exists()
