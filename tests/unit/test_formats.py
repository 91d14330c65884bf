import gzip
import io
import os
import pickle
import struct

import numpy as np
import pytest

from mlpaint.data.formats import (
    DataFormatError,
    load_pickle_archive,
    read_csv_split,
    read_idx,
    write_idx,
)
from mlpaint.data.pins import Split


def _idx(path, array):
    with path.open("wb") as out:
        write_idx(array, out)
    return path


def test_idx_round_trip(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    labels = np.array([3, 7], dtype=np.uint8)
    assert np.array_equal(read_idx(_idx(tmp_path / "i", images), expected_ndim=3), images)
    assert np.array_equal(read_idx(_idx(tmp_path / "l", labels), expected_ndim=1), labels)


def test_idx_header_is_big_endian_magic(tmp_path):
    raw = _idx(tmp_path / "l", np.zeros(5, dtype=np.uint8)).read_bytes()
    assert raw[:8] == struct.pack(">II", 0x00000801, 5)


def test_idx_wrong_magic_names_file(tmp_path):
    path = _idx(tmp_path / "labels-as-images", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataFormatError, match=r"labels-as-images.*wrong magic number 0x00000801"):
        read_idx(path, expected_ndim=3)


def test_idx_truncated_and_trailing(tmp_path):
    path = _idx(tmp_path / "short", np.zeros((3, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match="short: truncated"):
        read_idx(path, expected_ndim=3)
    path = _idx(tmp_path / "long", np.zeros(4, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataFormatError, match="trailing bytes"):
        read_idx(path, expected_ndim=1)
    (tmp_path / "empty").write_bytes(b"\0\0")
    with pytest.raises(DataFormatError, match="too short for an IDX header"):
        read_idx(tmp_path / "empty", expected_ndim=1)


def _archive(rows=(5, 3, 4)):
    rng = np.random.default_rng(1)
    parts = []
    for n in rows:
        pixels = rng.integers(0, 256, size=(n, 784)).astype(np.float32) / 256
        parts.append((pixels, rng.integers(0, 10, size=n).astype(np.int64)))
    return tuple(parts)


def test_pickle_archive_concatenates_train_and_valid():
    archive = _archive()
    arrays = load_pickle_archive(io.BytesIO(pickle.dumps(archive, protocol=2)), "a.pkl")
    train_images, train_labels = arrays[Split.TRAIN]
    assert train_images.shape == (8, 28, 28) and train_images.dtype == np.uint8
    expected = np.concatenate([archive[0][0], archive[1][0]]) * 256
    assert np.array_equal(train_images.reshape(8, 784), expected.astype(np.uint8))
    assert np.array_equal(train_labels, np.concatenate([archive[0][1], archive[1][1]]))
    assert arrays[Split.TEST][0].shape == (4, 28, 28)
    # The same archive written by Python 3 at a newer protocol loads identically.
    newer = load_pickle_archive(io.BytesIO(pickle.dumps(archive, protocol=5)), "a.pkl")
    assert np.array_equal(newer[Split.TRAIN][0], train_images)


def test_pickle_rejects_pixels_that_are_not_bytes():
    (x, y), valid, test = _archive()
    x = x + np.float32(0.001)
    with pytest.raises(DataFormatError, match="not byte/256"):
        load_pickle_archive(io.BytesIO(pickle.dumps(((x, y), valid, test))), "a.pkl")


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsACommand(marker), protocol=2)
    with pytest.raises(DataFormatError, match=r"refusing to load (posix|os)\.system"):
        load_pickle_archive(io.BytesIO(payload), "evil.pkl")
    assert not marker.exists()


def test_pickle_of_wrong_shape():
    with pytest.raises(DataFormatError, match="expected a \\(train, valid, test\\) tuple"):
        load_pickle_archive(io.BytesIO(pickle.dumps([1, 2])), "x.pkl")


def _csv(path, rows, header=True, label_name="label", n_pixels=784):
    lines = []
    if header:
        lines.append(",".join([label_name] + [f"x{i}" for i in range(n_pixels)]))
    for label, pixels in rows:
        lines.append(",".join(str(v) for v in [label, *pixels]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_with_and_without_header(tmp_path):
    rows = [(d, [d * 20] * 784) for d in range(10)]
    for header in (True, False):
        images, labels = read_csv_split(_csv(tmp_path / f"h{header}.csv", rows, header))
        assert images.shape == (10, 28, 28) and images.dtype == np.uint8
        assert labels.tolist() == list(range(10))
        assert images[3, 5, 5] == 60


def test_csv_label_column_anywhere(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(",".join([f"p{i}" for i in range(784)] + ["Label"]) + "\n"
                    + ",".join(["1"] * 784 + ["7"]) + "\n")
    images, labels = read_csv_split(path)
    assert labels.tolist() == [7] and images.sum() == 784


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        ([(1, [0] * 783)], {"n_pixels": 783}, "783 pixel columns, expected 784"),
        ([(1, [256] * 784)], {}, "pixel values outside 0..255"),
        ([(1, [0] * 784)], {"label_name": "digit"}, "no 'label' column"),
    ],
)
def test_csv_errors(tmp_path, rows, kwargs, message):
    with pytest.raises(DataFormatError, match=message):
        read_csv_split(_csv(tmp_path / "bad.csv", rows, **kwargs))


def test_gzip_is_handled_before_parsing(tmp_path):
    # Readers take decompressed files; decompression belongs to the fetch step.
    path = tmp_path / "l.gz"
    with gzip.open(path, "wb") as out:
        write_idx(np.zeros(3, dtype=np.uint8), out)
    with pytest.raises(DataFormatError):
        read_idx(path, expected_ndim=1)
