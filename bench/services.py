"""The services benchmarks start (moto S3, `mlpaint serve`, `prefect server start`): each its
own process in its own session, waited for until it answers over HTTP, and stopped with its
whole process group, children included."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import requests


def start_service(command: list[str], health_url: str, *, log: Path | None = None,
                  env: dict[str, str] | None = None, timeout_s: float = 120
                  ) -> subprocess.Popen:
    """Start `command` and return once `health_url` answers below 500; raise if the process
    exits or the time runs out first."""
    out = log.open("wb") if log else subprocess.DEVNULL
    process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(health_url, timeout=1).status_code < 500:
                return process
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_service(process)
            raise RuntimeError(f"{command[0]} did not answer on {health_url}"
                               + (f"; see {log}" if log else ""))
        time.sleep(0.2)


def stop_service(process: subprocess.Popen, timeout_s: float = 30) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def timed_run(command: list[str], env: dict[str, str], timeout_s: float = 600) -> float:
    """Wall seconds of `command` run to its end; raise with the tail of its stderr if it
    fails."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return seconds
