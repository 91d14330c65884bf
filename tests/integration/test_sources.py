"""Fetching through the product's own code from real servers on loopback: a fault-injecting
HTTP server and the moto S3 server, each its own process."""

import hashlib
import shutil

import boto3
import pytest
import requests

from mlpaint.data.dataset import table_from_files
from mlpaint.data.fetch import FetchContext, SourcesExhaustedError, fetch_dataset
from mlpaint.data.integrity import BlobCache, Pins
from mlpaint.data.pins import Split
from mlpaint.data.transports import RetryPolicy
from mlpaint.processes import free_port
from tests.conftest import make_tiny_mnist

pytestmark = pytest.mark.integration

FAST = RetryPolicy(attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1)


@pytest.fixture
def served_tiny(http_root, request):
    """Tiny MNIST under a folder of the HTTP root unique to this test."""
    folder = http_root / request.node.name
    written = make_tiny_mnist(folder, seed=len(request.node.name))
    pins = {name: hashlib.sha256(data).hexdigest() for name, data in written.items()}
    return request.node.name, pins


def _context(tmp_path, pins, attempts=FAST.attempts):
    retry = RetryPolicy(attempts=attempts, initial_backoff_s=0.05, max_backoff_s=0.1)
    return FetchContext(Pins(pins), BlobCache(tmp_path / "cache"), retry=retry)


def _hits(http_server, fragment):
    counts = requests.get(f"{http_server}/__requests", timeout=5).json()
    return sum(n for path, n in counts.items() if fragment in path)


def test_http_5xx_then_success(http_server, served_tiny, tmp_path):
    name, pins = served_tiny
    fetched = fetch_dataset([f"{http_server}/flaky/2/{name}/{name}/"], _context(tmp_path, pins))
    assert table_from_files(fetched[Split.TRAIN]).meta.rows == 60
    # every file failed twice with 503 and succeeded on the third try
    assert _hits(http_server, f"/flaky/2/{name}/") == 3 * 4


def test_http_connection_dropped_mid_body_is_retried(http_server, served_tiny, tmp_path):
    name, pins = served_tiny
    fetched = fetch_dataset([f"{http_server}/drop/1/{name}/{name}/"], _context(tmp_path, pins))
    assert fetched[Split.TEST].verified
    assert _hits(http_server, f"/drop/1/{name}/") == 2 * 4


def test_http_persistent_5xx_moves_to_next_mirror(http_server, served_tiny, tmp_path):
    name, pins = served_tiny
    fetched = fetch_dataset([f"{http_server}/flaky/99/{name}/{name}/",
                             f"{http_server}/files/{name}/"], _context(tmp_path, pins))
    assert fetched[Split.TRAIN].origin == f"{http_server}/files/{name}/"


def test_dead_first_mirror(http_server, served_tiny, tmp_path):
    name, pins = served_tiny
    dead = f"http://127.0.0.1:{free_port()}/mnist/"  # nothing listens: connection refused
    fetched = fetch_dataset([dead, f"{http_server}/files/{name}/"], _context(tmp_path, pins))
    assert fetched[Split.TEST].origin.endswith(f"/files/{name}/")


def test_wrong_hash_over_http_is_rejected(http_server, served_tiny, tmp_path):
    name, pins = served_tiny
    pins["t10k-labels-idx1-ubyte"] = "0" * 64
    with pytest.raises(SourcesExhaustedError, match=r"t10k-labels-idx1-ubyte\.gz: decompressed"):
        fetch_dataset([f"{http_server}/files/{name}/"], _context(tmp_path, pins))
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_second_run_downloads_nothing(http_server, served_tiny, tmp_path):
    name, pins = served_tiny
    source = f"{http_server}/files/{name}/"
    fetch_dataset([source], _context(tmp_path, pins))
    before = _hits(http_server, f"/files/{name}/")
    fetch_dataset([source], _context(tmp_path, pins))
    assert _hits(http_server, f"/files/{name}/") == before == 4


def test_s3_with_credentials_and_unsigned(s3_env, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="tiny-digits")
    folder = tmp_path / "tiny"
    written = make_tiny_mnist(folder, seed=3)
    for path in folder.iterdir():
        # public-read, like a public dataset bucket: anonymous requests may read it
        s3.upload_file(str(path), "tiny-digits", f"data/mnist/{path.name}",
                       ExtraArgs={"ACL": "public-read"})
    pins = {name: hashlib.sha256(data).hexdigest() for name, data in written.items()}
    signed = fetch_dataset(["s3://tiny-digits/data/mnist"], _context(tmp_path / "a", pins))
    assert table_from_files(signed[Split.TRAIN]).label_counts() == [6] * 10
    unsigned = fetch_dataset(["s3://tiny-digits/data/mnist/?unsigned=true"],
                             _context(tmp_path / "b", pins))
    assert unsigned[Split.TEST].sha256 == signed[Split.TEST].sha256


def test_s3_missing_bucket_falls_through(s3_env, http_server, served_tiny, tmp_path):
    name, pins = served_tiny
    fetched = fetch_dataset(["s3://no-such-bucket/mnist/", f"{http_server}/files/{name}/"],
                            _context(tmp_path, pins))
    assert fetched[Split.TRAIN].origin.startswith(http_server)


def test_real_mnist_over_http(http_server, http_root, shared_mnist, tmp_path):
    target = http_root / "real-mnist"
    if not target.exists():
        shutil.copytree(shared_mnist, target)
    fetched = fetch_dataset([f"{http_server}/files/real-mnist/"], _context(tmp_path, {}))
    assert all(files.verified for files in fetched.values())
    test = table_from_files(fetched[Split.TEST])
    assert test.label_counts() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
