"""Services run as child processes: a free loopback port to give one, starting one in its own
session and waiting until it answers over HTTP, and stopping its whole process group.

The CLI's temporary Prefect server takes its port from here; the tests and the benchmarks
start every server they use (moto S3, `mlpaint serve`, Prefect, MLflow, Dask) through these.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sqlite_files_state(database: Path) -> tuple:
    """The size and modification time of a SQLite database and of its journal or write-ahead
    log, whichever exist: what changes while a process writes it (a server migrating it)."""
    state = []
    for path in (database, database.with_name(database.name + "-journal"),
                 database.with_name(database.name + "-wal")):
        try:
            stat = path.stat()
        except OSError:
            continue
        state.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(state)


def start_service(command: list[str], health_url: str, *, env: dict[str, str] | None = None,
                  log: Path | None = None, timeout_s: float = 120, cwd: Path | None = None
                  ) -> subprocess.Popen:
    """Start `command` in its own session (so stopping it ends its children too) and return
    once `health_url` answers below 500. Raise, with the service stopped, if the process
    exits or the time runs out first; `log` gets its output."""
    out = log.open("wb") if log else subprocess.DEVNULL
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(health_url, timeout=2).status_code < 500:
                return process
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            how = (f"exited with {process.returncode}" if process.poll() is not None
                   else f"did not answer in {timeout_s} s")
            stop_service(process)
            raise RuntimeError(f"{command[0]} {how} on {health_url}"
                               + (f"; see {log}" if log else ""))
        time.sleep(0.2)


def stop_service(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the service's process group, SIGKILL if it outlives `timeout_s`."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
