import hashlib

import pytest

from mlpaint.data.integrity import BlobCache, Pins, atomic_path, parse_sha256_pins

HEX = "a" * 64


def test_parse_pins():
    assert parse_sha256_pins([f"train.csv={HEX.upper()}"]) == {"train.csv": HEX}
    for bad, message in (("train.csv", "NAME=HEX"), ("x=abc", "64 hexadecimal"),
                         (f"a/b={HEX}", "not a path"), (f"={HEX}", "NAME=HEX")):
        with pytest.raises(ValueError, match=message):
            parse_sha256_pins([bad])


def test_user_pins_override_builtin():
    pins = Pins({"train-labels-idx1-ubyte": HEX})
    assert pins.for_name("train-labels-idx1-ubyte") == HEX
    assert pins.for_name("t10k-labels-idx1-ubyte").startswith("ff7bcfd4")
    assert pins.for_name("mystery.csv") is None


def test_cache_evicts_a_corrupt_blob(tmp_path):
    cache = BlobCache(tmp_path)
    data = b"hello"
    digest = hashlib.sha256(data).hexdigest()
    staged = tmp_path / "staged"
    staged.write_bytes(data)
    stored = cache.store(staged, digest)
    assert cache.lookup(digest) == stored
    stored.write_bytes(b"bit rot")
    assert cache.lookup(digest) is None
    assert not stored.exists()


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"
