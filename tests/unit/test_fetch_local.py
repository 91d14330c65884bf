"""The fetch chain on local files: pins, unverified data, fallbacks, the cache."""

import gzip
import hashlib
import logging
import pickle
import shutil

import numpy as np
import pytest

from mlpaint.data.dataset import table_from_files
from mlpaint.data.fetch import (
    FetchContext,
    SourcesExhaustedError,
    fetch_dataset,
    parse_source,
)
from mlpaint.data.integrity import BlobCache, Pins
from mlpaint.data.pins import Split
from mlpaint.data.transports import RetryPolicy

FAST = RetryPolicy(attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)


def _context(tmp_path, pins=None):
    return FetchContext(Pins(pins or {}), BlobCache(tmp_path / "cache"), retry=FAST)


def _pins_for(written):
    return {name: hashlib.sha256(data).hexdigest() for name, data in written.items()}


def test_user_pinned_folder_is_verified_and_joined(tmp_path, tiny_mnist):
    folder, written = tiny_mnist
    fetched = fetch_dataset([str(folder)], _context(tmp_path, _pins_for(written)))
    assert fetched[Split.TRAIN].verified and fetched[Split.TEST].verified
    table = table_from_files(fetched[Split.TRAIN])
    assert table.meta.rows == 60 and table.label_counts() == [6] * 10


def test_builtin_pins_reject_other_bytes_with_the_same_names(tmp_path, tiny_mnist):
    folder, _ = tiny_mnist  # canonical names, different content: must not pass as MNIST
    with pytest.raises(SourcesExhaustedError, match="does not match the pinned"):
        fetch_dataset([str(folder)], _context(tmp_path))


def test_unpinned_csv_is_used_with_a_loud_warning(tmp_path, caplog):
    csv = tmp_path / "digits_train.csv"
    csv.write_text("label," + ",".join(f"p{i}" for i in range(784)) + "\n"
                   + "\n".join(f"{d}," + ",".join([str(d)] * 784) for d in range(10)) + "\n")
    test_csv = tmp_path / "digits_test.csv.gz"
    test_csv.write_bytes(gzip.compress(csv.read_bytes()))
    with caplog.at_level(logging.WARNING):
        fetched = fetch_dataset([str(csv), str(test_csv)], _context(tmp_path))
    assert not fetched[Split.TRAIN].verified
    assert sum("UNVERIFIED DATA" in r.getMessage() for r in caplog.records) == 2
    assert table_from_files(fetched[Split.TEST]).meta.rows == 10


def test_pinned_csv_by_compressed_or_plain_hash(tmp_path):
    body = ("label," + ",".join(f"p{i}" for i in range(784)) + "\n3," + ",".join(["0"] * 784)
            + "\n").encode()
    (tmp_path / "train.csv.gz").write_bytes(gzip.compress(body))
    (tmp_path / "test.csv").write_bytes(body)
    pins = {"train.csv.gz": hashlib.sha256((tmp_path / "train.csv.gz").read_bytes()).hexdigest(),
            "test.csv": hashlib.sha256(body).hexdigest()}
    fetched = fetch_dataset([str(tmp_path / "train.csv.gz"), str(tmp_path / "test.csv")],
                            _context(tmp_path, pins))
    assert fetched[Split.TRAIN].verified and fetched[Split.TEST].verified
    pins["test.csv"] = "0" * 64
    with pytest.raises(SourcesExhaustedError, match=r"test\.csv.*does not match"):
        fetch_dataset([str(tmp_path / "train.csv.gz"), str(tmp_path / "test.csv")],
                      _context(tmp_path / "other", pins))


def test_a_dead_source_falls_through_to_the_next(tmp_path, tiny_mnist):
    folder, written = tiny_mnist
    fetched = fetch_dataset([str(tmp_path / "missing"), str(folder)],
                            _context(tmp_path, _pins_for(written)))
    assert fetched[Split.TRAIN].origin == str(folder)


def test_second_run_reads_only_the_cache(tmp_path, tiny_mnist):
    folder, written = tiny_mnist
    context = _context(tmp_path, _pins_for(written))
    first = fetch_dataset([str(folder)], context)
    shutil.rmtree(folder)  # the source is gone; pinned files come from the cache
    second = fetch_dataset([str(folder)], context)
    assert second[Split.TRAIN].images == first[Split.TRAIN].images
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []  # no partial files left


def test_truncated_gzip_is_a_named_error(tmp_path, tiny_mnist):
    folder, written = tiny_mnist
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(SourcesExhaustedError, match=r"t10k-labels-idx1-ubyte\.gz: corrupt or"):
        fetch_dataset([str(folder)], _context(tmp_path, _pins_for(written)))


def test_malicious_pickle_source_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    archive = tmp_path / "evil.pkl.gz"
    archive.write_bytes(gzip.compress(pickle.dumps(Evil(), protocol=2)))
    pins = {"evil.pkl.gz": hashlib.sha256(archive.read_bytes()).hexdigest()}
    with pytest.raises(SourcesExhaustedError, match="refusing to load"):
        fetch_dataset([str(archive)], _context(tmp_path, pins))
    assert not marker.exists()


def test_pickle_with_a_wrong_hash_is_never_unpickled(tmp_path, monkeypatch):
    archive = tmp_path / "mnist.pkl.gz"  # the built-in pin applies to this name
    archive.write_bytes(gzip.compress(pickle.dumps((1, 2, 3))))
    opened = []
    monkeypatch.setattr("mlpaint.data.fetch.load_pickle_archive",
                        lambda *a: opened.append(a) or {})
    with pytest.raises(SourcesExhaustedError, match="does not match the pinned"):
        fetch_dataset([str(archive)], _context(tmp_path))
    assert opened == []


def test_pickle_archive_becomes_idx(tmp_path):
    rng = np.random.default_rng(0)
    parts = tuple((rng.integers(0, 256, (n, 784)).astype(np.float32) / 256,
                   (np.arange(n) % 10).astype(np.int64)) for n in (20, 10, 10))
    archive = tmp_path / "mine.pkl.gz"
    archive.write_bytes(gzip.compress(pickle.dumps(parts, protocol=2)))
    fetched = fetch_dataset([str(archive)], _context(tmp_path))
    assert not fetched[Split.TRAIN].verified  # no pin given: used, loudly unverified
    table = table_from_files(fetched[Split.TRAIN])
    assert table.meta.rows == 30
    assert np.array_equal(table.pixels[25], (parts[1][0][5] * 256).astype(np.uint8))


@pytest.mark.parametrize(
    ("uri", "kind"),
    [("s3://b/mnist/", "IdxFolderSource"), ("https://h/x/mnist.pkl.gz", "PickleArchiveSource"),
     ("/data/mnist_test.csv.gz", "CsvSource"), ("file:///d/train.csv", "CsvSource")],
)
def test_layout_inferred_from_name(uri, kind):
    assert type(parse_source(uri)).__name__ == kind


@pytest.mark.parametrize(
    ("uri", "message"),
    [("/d/digits.csv", "cannot tell the split"), ("/d/train-images-idx3-ubyte.gz", "folder"),
     ("ftp://host/x/", "unsupported source scheme")],
)
def test_bad_sources_are_named(uri, message):
    with pytest.raises(ValueError, match=message):
        parse_source(uri).fetch(frozenset(Split), None)
