"""The Prefect API a `mlpaint` command's flow reports to.

With PREFECT_API_URL set, that server's. Without it, Prefect's client starts a temporary local
server when the flow begins (`SubprocessASGIServer`): it imports Prefect's whole server into
the command's process (about 5 s here), then launches uvicorn, which imports it again, and
waits until it answers (7 to 9 s), all before the flow's first step. `temporary_api()`
launches the same server, with the same command and environment, as soon as the command
knows it will run a flow, before even Prefect is imported, so the server comes up on the
other core while the command loads the flow's modules; and the command's process never
imports the server. `bench.startup` measures the difference."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mlpaint.processes import free_port

logger = logging.getLogger("mlpaint")

# How long a temporary server gets to stop on SIGTERM before it is killed (Prefect's own).
_STOP_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _launch(port: int) -> subprocess.Popen:
    """The server Prefect's SubprocessASGIServer runs: uvicorn on Prefect's app factory, the UI
    off, marked ephemeral. Launched without importing Prefect here (that takes about 2 s):
    the server reads the same environment and profile as this process, and this process has
    set no Prefect setting in code yet."""
    package = importlib.util.find_spec("prefect")
    if package is None or not package.submodule_search_locations:
        raise RuntimeError("prefect is not installed")
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1",
           # No block types registered on start (0.2 s of its start, even when memoized):
           # nothing of mlpaint's uses blocks, and this server dies with the command.
           "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
           "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false"}
    app_dir = Path(package.submodule_search_locations[0]).parent
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir),
         "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, stdin=subprocess.DEVNULL,
        preexec_fn=(functools.partial(_end_with_parent, os.getpid())
                    if sys.platform == "linux" else None))


def _end_with_parent(parent: int) -> None:
    """In the server's process before it starts: the kernel sends it SIGTERM when the
    command's thread that launched it dies. A command killed outright (SIGKILL, or a
    SIGTERM that skips Python's cleanup) otherwise leaves a server running for good, its
    services polling and holding Prefect's local database."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the command died before the request took hold
        os._exit(1)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _send_what_is_queued() -> None:
    """Prefect sends run logs and events from background queues, which it drains at exit,
    before its own temporary server stops; this server stops earlier, so it drains them
    first."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=_STOP_GRACE_S)
    EventsWorker.drain_all(timeout=_STOP_GRACE_S)


@contextlib.contextmanager
def temporary_api() -> Iterator[Callable[[], None]]:
    """Within the block, the Prefect API the command's flows use, and a function that waits
    until it answers (call it just before the flow). PREFECT_API_URL's server when set;
    otherwise a temporary local server launched on entry and stopped on exit."""
    # Launched first, before Prefect is imported, unless the environment names an API; a
    # profile that names one is known only once Prefect has read it, and then the launched
    # server is stopped unused.
    port = free_port()
    process = None if os.environ.get("PREFECT_API_URL") else _launch(port)
    import httpx
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        PREFECT_UI_URL,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        if process is not None:
            _stop(process)
        yield lambda: None
        return
    if process is None:  # the environment names an API that this process's settings, set in
        # code (a caller's temporary_settings), override with none
        process = _launch(port)
    api_url = f"http://127.0.0.1:{port}/api"
    logger.info("starting a temporary Prefect server on %s (set PREFECT_API_URL to use "
                "yours)", api_url)

    def wait_until_ready() -> None:
        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        # One client for every poll: `httpx.get` builds a client, and an SSL context with
        # it, each time (15 ms of the interpreter, which the command's other threads need
        # while it waits).
        with httpx.Client(timeout=2) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the temporary Prefect server exited with status "
                                       f"{process.returncode} before it answered")
                try:
                    if client.get(f"{api_url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the temporary Prefect server did not answer "
                                       f"{api_url} in time")
                time.sleep(0.02)  # the flow starts when it answers: poll often

    # No UI URL: the server serves no UI and is gone when the command ends, so runs get no
    # "View at" links (in logs, MLflow tags, artifacts), as with Prefect's own temporary
    # server. In the environment too: processes the flow starts (a local Dask cluster's
    # workers) read their settings from it.
    settings = {"PREFECT_API_URL": api_url, "PREFECT_UI_URL": ""}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        # No flow run heartbeats either. They tell a server that outlives the process that
        # a run still lives (how a crashed run is noticed); this server dies with the
        # command. And ending a run waits for its heartbeat thread's current 1 s sleep:
        # half a second a flow run, on the training run's critical path twice.
        with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_UI_URL: "",
                                         PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            try:
                yield wait_until_ready
            finally:  # a failed run's last logs matter most
                _send_what_is_queued()
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _stop(process)
