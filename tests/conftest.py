"""Shared fixtures: real services started as their own processes on loopback.

- `http_server`: tests/servers/fault_http.py (static files plus injected faults)
- `moto_s3`: the moto S3 server, reached through boto3 with AWS_ENDPOINT_URL
- `prefect_api`: `prefect server start`, so CLI subprocesses share one real API
- `browser`: Debian's headless chromium, driven by Playwright
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import requests

from mlpaint.data.formats import write_idx
from mlpaint.processes import free_port, start_service, stop_service

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SHARED_MNIST = Path(os.environ.get("MLPAINT_SHARED_MNIST", REPO.parent / "shared/data/mnist"))
SHARED_PENDIGITS = REPO.parent / "shared/data/pendigits/pendigits-orig.tra"


def pytest_configure(config) -> None:
    # Prefect's temporary server races its telemetry heartbeat against its own SQLite writes
    # and logs "database is locked" tracebacks; the tests need no telemetry.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pytest_sessionfinish(session, exitstatus) -> None:
    # A flow run in this process without an API URL starts Prefect's temporary server, which
    # Prefect stops from `atexit`: after pytest has closed the output its logger writes to,
    # so every run ended with a "Logging error" traceback. Stop it while that output is open.
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()


@pytest.fixture(scope="session")
def shared_mnist() -> Path:
    """A folder of the four official MNIST files (gzip IDX): `../shared/data/mnist` where it
    exists (CI sets MLPAINT_REQUIRE_SHARED=1, so there a missing copy fails); elsewhere MNIST
    fetched once through the product's own mirror chain into its cache, so a user's machine
    runs every test too."""
    if (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        return SHARED_MNIST
    if os.environ.get("MLPAINT_REQUIRE_SHARED") == "1":
        pytest.fail(f"MNIST copy missing at {SHARED_MNIST}")
    from mlpaint.data.integrity import default_cache_dir

    return mnist_from_mirrors(default_cache_dir())


def mnist_from_mirrors(cache_dir: Path) -> Path:
    """The four MNIST files as gzip IDX under `cache_dir/test-mnist`, fetched and verified
    through the default mirror chain into the blob cache the first time (the decompressed
    bytes are pinned; the gzip wrapping is ours, which the product accepts, as mirrors
    recompress)."""
    from mlpaint.data.fetch import FetchContext, fetch_dataset
    from mlpaint.data.integrity import BlobCache, Pins
    from mlpaint.data.pins import MNIST_IDX_FILES

    folder = cache_dir / "test-mnist"
    targets = {idx: folder / f"{idx.name}.gz" for idx in MNIST_IDX_FILES}
    if all(path.is_file() for path in targets.values()):
        return folder
    blobs = BlobCache(cache_dir)
    fetch_dataset(None, FetchContext(Pins(), blobs))
    folder.mkdir(parents=True, exist_ok=True)
    for idx, target in targets.items():
        staging = target.with_name(f".{target.name}.{os.getpid()}")
        # fetch_dataset has just verified the blob (or the cached copy) by its hash.
        with blobs.blob_path(idx.sha256).open("rb") as source, \
                gzip.open(staging, "wb", compresslevel=1) as out:
            shutil.copyfileobj(source, out)
        staging.replace(target)  # whole or not at all, should two sessions race
    return folder


def make_tiny_mnist(folder: Path, *, train_rows: int = 60, test_rows: int = 20, seed: int = 0,
                    compress: bool = True) -> dict[str, bytes]:
    """Write the four IDX files (random pixels, every digit present) and return their
    decompressed bytes by canonical name."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, bytes] = {}
    for prefix, rows in (("train", train_rows), ("t10k", test_rows)):
        images = rng.integers(0, 256, size=(rows, 28, 28), dtype=np.uint8)
        labels = (np.arange(rows) % 10).astype(np.uint8)
        for kind, array, ndim in (("images", images, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}-idx{ndim}-ubyte"
            path = folder / (name + ".gz" if compress else name)
            with (gzip.open(path, "wb") if compress else path.open("wb")) as out:
                write_idx(array, out)
            written[name] = (gzip.decompress(path.read_bytes()) if compress
                             else path.read_bytes())
    return written


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path / "tiny"
    return folder, make_tiny_mnist(folder)


@pytest.fixture(scope="session")
def http_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("http-root")


@pytest.fixture(scope="session")
def http_server(http_root: Path, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    process = start_service(
        [sys.executable, "-m", "tests.servers.fault_http", str(http_root), str(port)],
        f"http://127.0.0.1:{port}/__requests",
        log=tmp_path_factory.mktemp("logs") / "http.log")
    yield f"http://127.0.0.1:{port}"
    stop_service(process)


@pytest.fixture(scope="session")
def shared_pendigits(tmp_path_factory) -> Path:
    """UCI's pen trajectories as UCI's README describes them (`../shared/data/pendigits`,
    required on CI); elsewhere the copy mlpaint ships, decompressed, so every test runs."""
    if SHARED_PENDIGITS.is_file():
        return SHARED_PENDIGITS
    if os.environ.get("MLPAINT_REQUIRE_SHARED") == "1":
        pytest.fail(f"pen trajectories missing at {SHARED_PENDIGITS}")
    from mlpaint.data.pendigits import packaged_pen_copy

    copy = tmp_path_factory.mktemp("pendigits") / SHARED_PENDIGITS.name
    copy.write_bytes(gzip.decompress(packaged_pen_copy().read_bytes()))
    return copy


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    assert moto, "moto_server is installed with the dev extras"
    process = start_service([moto, "-H", "127.0.0.1", "-p", str(port)],
                            f"http://127.0.0.1:{port}/moto-api/",
                            log=tmp_path_factory.mktemp("logs") / "moto.log")
    yield f"http://127.0.0.1:{port}"
    stop_service(process)


@pytest.fixture
def s3_env(moto_s3: str, monkeypatch) -> dict[str, str]:
    """Point boto3 (in this process and in subprocesses) at the moto server."""
    values = {"AWS_ENDPOINT_URL": moto_s3, "AWS_ACCESS_KEY_ID": "testing",
              "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """A real `prefect server start`; CLI subprocesses talk to it instead of each starting
    a temporary server of their own."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    prefect = str(Path(sys.executable).parent / "prefect")
    process = start_service([prefect, "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], f"http://127.0.0.1:{port}/api/health", env=env,
                            log=home / "server.log", timeout_s=120)
    yield f"http://127.0.0.1:{port}/api"
    stop_service(process)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """Debian's redis-server on loopback, in memory only: a storage `limits` shares among
    server processes."""
    from limits.storage import storage_from_string

    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    with (folder / "redis.log").open("wb") as log:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(folder)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: process.poll() is None and storage_from_string(url).check(),
                 f"redis-server on port {port}", timeout_s=30)
        yield url
    finally:
        stop_service(process)


@pytest.fixture
def cli_env(prefect_api: str, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_api,
            "PREFECT_HOME": str(tmp_path / "prefect-client"),
            "MLPAINT_CACHE_DIR": str(tmp_path / "cache")}


T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, *, timeout_s: float = 60.0,
             interval_s: float = 0.2) -> T:
    """Call `condition` every `interval_s` until it returns something truthy, and return that;
    fail the test, naming `what` was awaited, after `timeout_s`. The condition may itself
    assert what must hold meanwhile (a process still running, a run not yet ended)."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)
    return result


def official_test_digits(mnist: Path | str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` official test digits as (count, 784) uint8 pixels, and labels, read
    straight from MNIST's files."""
    with gzip.open(Path(mnist) / "t10k-images-idx3-ubyte.gz") as handle:
        pixels = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(Path(mnist) / "t10k-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8)
    return pixels[:count].copy(), labels[:count].copy()


def prefect_events(api: str, name: str, since: datetime) -> list[dict]:
    """The events named `name` since `since` on a Prefect API, each once: the API is shared
    by the session, and earlier tests post some of the same drawings (so the same record ids)
    to it; and pages read while events still arrive shift, so one event can appear on two
    pages."""
    response = requests.post(f"{api}/events/filter", json={
        "filter": {"event": {"name": [name]}, "occurred": {"since": since.isoformat()}},
        "limit": 50}, timeout=10)
    response.raise_for_status()
    page = response.json()
    events = page["events"]
    while page.get("next_page"):  # 50 events a page
        page = requests.get(page["next_page"], timeout=10).json()
        events += page["events"]
    return list({event["id"]: event for event in events}.values())


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric in Prometheus' text format, by their sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {tuple(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


def counted_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """`metric_samples` without the series still at 0 (the server starts every series it
    can count at 0)."""
    return {labels: value for labels, value in metric_samples(text, name).items() if value}


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300
            ) -> subprocess.CompletedProcess:
    mlpaint = str(Path(sys.executable).parent / "mlpaint")
    return subprocess.run([mlpaint, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium (`playwright install` cannot download here), headless."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: .ci/run installs Debian's chromium")
        pytest.skip(f"no {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()
