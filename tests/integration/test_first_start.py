"""A command's first start in a new Prefect home, as a newcomer's first `make run` meets it:
the temporary server creates and migrates Prefect's database, which on a busy machine takes
far longer than Prefect's startup timeout. It must be waited for while it makes progress (and
only one command at a time may create it), yet a server that exits or hangs is reported at
once, with its last line."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.integration

MLPAINT = str(Path(sys.executable).parent / "mlpaint")


def _fresh_home_env(tmp_path: Path, name: str, stall_s: int) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLPAINT_CACHE_DIR": str(tmp_path / f"cache-{name}"),
           # Prefect's startup timeout, well below its default of 20 s: here it bounds only
           # how long a start may go without progress, which a first start under load never
           # does, while a fixed deadline this short fails every first start.
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(stall_s)}
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture
def busy_cores() -> Iterator[None]:
    """Every core kept busy, twice over, for the test's length (a build or an install beside
    the command)."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(2 * (os.cpu_count() or 1))]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


def test_two_first_commands_on_a_busy_machine_both_succeed(busy_cores, shared_mnist, tmp_path):
    commands = {name: subprocess.Popen(
        [MLPAINT, "data", "fetch", "--source", str(shared_mnist), "--json"],
        env=_fresh_home_env(tmp_path, name, stall_s=5), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=REPO) for name in ("first", "second")}
    outputs = {name: command.communicate(timeout=600) for name, command in commands.items()}
    for name, command in commands.items():
        assert command.returncode == 0, f"{name}: {outputs[name][1]}"
        assert json.loads(outputs[name][0])["splits"]["train"]["rows"] == 60_000
    stderrs = [stderr for _, stderr in outputs.values()]
    # One command created the database, saying so; the other waited for it, then started on
    # the database it made.
    assert sum("first start: creating Prefect's database" in s for s in stderrs) == 1
    assert sum("another command is creating Prefect's database" in s for s in stderrs) == 1
    assert "Prefect's database is created" in "".join(stderrs)
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        states = db.execute("SELECT state_type FROM flow_run").fetchall()
    assert states == [("COMPLETED",), ("COMPLETED",)]


def test_a_server_that_exits_is_reported_at_once_with_its_last_line(tmp_path):
    env = _fresh_home_env(tmp_path, "only", stall_s=20)
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = "postgresql+asyncpg://nobody@127.0.0.1:1/x"
    result = subprocess.run([MLPAINT, "data", "fetch", "--source", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mlpaint: error: the temporary Prefect server exited with status")
    # The line the server died with, not a generic timeout.
    assert "its last line: " in last and "(it printed nothing)" not in last


def test_a_server_that_hangs_is_reported_once_it_makes_no_progress(tmp_path):
    """A server stopped outright (SIGSTOP: no CPU time, no database writes) during its first
    start is a hang, reported after the startup timeout without progress, not after the
    first start's long allowance."""
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        command = subprocess.Popen([MLPAINT, "data", "fetch", "--source", str(tmp_path)],
                                   env=_fresh_home_env(tmp_path, "only", stall_s=3),
                                   stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO)
    try:
        server = wait_for(lambda: psutil.Process(command.pid).children(), "the server")[0]
        server.send_signal(signal.SIGSTOP)
        command.wait(timeout=120)
    finally:
        command.kill()
    last = stderr_path.read_text().strip().splitlines()[-1]
    assert command.returncode == 1
    assert "hangs: no CPU time used and its database untouched for 3 s" in last, last
    assert not psutil.pid_exists(server.pid) or server.status() == psutil.STATUS_ZOMBIE
