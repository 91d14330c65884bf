"""The Prefect API a `mlpaint` command's flow reports to.

With PREFECT_API_URL set, that server's. Without it, Prefect's client starts a temporary local
server when the flow begins (`SubprocessASGIServer`): it imports Prefect's whole server into
the command's process, then launches uvicorn, which imports it again, and waits until it
answers, all before the flow's first step. `temporary_api()` launches the same server, with
the same command and environment, as soon as the command knows it will run a flow, before
even Prefect is imported, so the server comes up on the other core while the command loads
the flow's modules; and the command's process never imports the server. `bench.startup`
measures the difference.

A server's first start in a Prefect home also creates and migrates its database, which takes
many times longer than a later start on a slow or busy machine, and two servers migrating one
SQLite database at once break each other's migration (PrefectHQ/prefect#16397). So the first
start is done by one command at a time, under a lock in the Prefect home, and is waited for
as long as it makes progress; other commands wait for it, then start on the database it made.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from mlpaint.processes import free_port, sqlite_files_state

logger = logging.getLogger("mlpaint")

# How long a temporary server gets to stop on SIGTERM before it is killed (Prefect's own).
_STOP_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The longest a first start (creating and migrating the database) may take while it still
# makes progress; Prefect's startup timeout bounds how long it may go without any.
FIRST_START_LIMIT_S = 900.0
# The same bound for a later start, whose database exists: on an idle machine it answers in a
# few seconds, so this only allows for a machine that is very busy.
LATER_START_LIMIT_S = 180.0
_LOG_LINES_KEPT = 20
_FIRST_START_LOCK = ".mlpaint-first-start.lock"


def prefect_database(environ: dict[str, str] | os._Environ = os.environ) -> Path | None:
    """The SQLite file a server started from this environment keeps its state in: Prefect's
    default, `prefect.db` in the Prefect home, or the file a SQLite connection URL names.
    None for another database (a PostgreSQL server is created by whoever runs it)."""
    home = Path(environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    url = (environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
           or environ.get("PREFECT_API_DATABASE_CONNECTION_URL"))
    if not url:
        return home / "prefect.db"
    scheme, _, rest = url.partition(":///")
    if not scheme.startswith("sqlite") or not rest or rest.startswith(":memory:"):
        return None
    return Path(rest.split("?", 1)[0].replace("${PREFECT_HOME}", str(home))).expanduser()


def _is_created(database: Path) -> bool:
    return database.is_file() and database.stat().st_size > 0


@dataclass
class _ServerOutput:
    """The server's output, passed on to the command's stderr as it comes, its last lines
    kept to say why a start failed."""

    process: subprocess.Popen
    lines: collections.deque[str]
    thread: threading.Thread | None = None

    @classmethod
    def follow(cls, process: subprocess.Popen) -> _ServerOutput:
        output = cls(process, collections.deque(maxlen=_LOG_LINES_KEPT))
        output.thread = threading.Thread(target=output._copy, name="prefect-server-output",
                                         daemon=True)
        output.thread.start()
        return output

    def finished(self, timeout_s: float) -> None:
        """Wait (a little) for the output of a server that has exited to be read whole."""
        if self.thread is not None:
            self.thread.join(timeout_s)

    def _copy(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode(errors="replace")
            sys.stderr.write(line)
            if line.strip():
                self.lines.append(line.rstrip())

    def last_line(self) -> str:
        return self.lines[-1] if self.lines else "(it printed nothing)"


def _launch(port: int) -> subprocess.Popen:
    """The server Prefect's SubprocessASGIServer runs: uvicorn on Prefect's app factory, the UI
    off, marked ephemeral. Launched without importing Prefect here (that takes seconds):
    the server reads the same environment and profile as this process, and this process has
    set no Prefect setting in code yet."""
    package = importlib.util.find_spec("prefect")
    if package is None or not package.submodule_search_locations:
        raise RuntimeError("prefect is not installed")
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1",
           # No block types registered on start (a part of every start, even memoized):
           # nothing of mlpaint's uses blocks, and this server dies with the command.
           "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
           "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false"}
    app_dir = Path(package.submodule_search_locations[0]).parent
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir),
         "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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


class _Progress:
    """Whether a starting server still works: CPU time used or its database written since
    the last look. A start that is slow because the machine is busy keeps doing both; one
    that hangs does neither."""

    def __init__(self, pid: int, database: Path | None) -> None:
        self._process = psutil.Process(pid)
        self._database = database
        self._last: tuple | None = None
        self._since = time.monotonic()

    def _signature(self) -> tuple:
        try:
            times = self._process.cpu_times()
            cpu = times.user + times.system
        except psutil.Error:  # it exited: the caller's poll says so
            cpu = None
        return cpu, sqlite_files_state(self._database) if self._database else ()

    def idle_for(self) -> float:
        """Seconds since the server last used CPU time or wrote its database."""
        now = time.monotonic()
        signature = self._signature()
        if signature != self._last:
            self._last, self._since = signature, now
        return now - self._since


class _TemporaryServer:
    """One temporary server: launched at once, waited for as long as it makes progress, its
    output passed on. The first start in a Prefect home holds the home's creation lock
    until the server answers, so no second server migrates the database beside it."""

    def __init__(self, port: int) -> None:
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.database = prefect_database()
        self._creation_lock = self._lock_if_first_start()
        self.process = _launch(port)
        self.output = _ServerOutput.follow(self.process)
        self._launched = time.monotonic()

    def _lock_if_first_start(self) -> FileLock | None:
        """The creation lock, held, if this start creates the database; else None, once any
        other command's creation of it has finished."""
        if self.database is None:
            return None
        self.database.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.database.parent / _FIRST_START_LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("another command is creating Prefect's database %s; waiting for it",
                        self.database)
            try:
                lock.acquire(timeout=FIRST_START_LIMIT_S)
            except Timeout:
                raise RuntimeError(
                    f"another command has been creating Prefect's database {self.database} "
                    f"for {FIRST_START_LIMIT_S / 60:.0f} minutes; stop it, or set "
                    "PREFECT_API_URL to a running server") from None
        if _is_created(self.database):
            lock.release()
            return None
        logger.info("first start: creating Prefect's database %s (it takes longer than a "
                    "later start; minutes on a busy machine) …", self.database)
        return lock

    def wait_until_ready(self, stall_s: float) -> None:
        """Return once the server answers. Raise, with its last line, as soon as it exits, once
        it has gone `stall_s` without progress, or once a start has taken far too long."""
        import httpx  # after the launch: the server starts while this imports

        first = self._creation_lock is not None
        limit_s = FIRST_START_LIMIT_S if first else LATER_START_LIMIT_S
        progress = _Progress(self.process.pid, self.database)
        # One client for every poll: `httpx.get` builds a client, and an SSL context with
        # it, each time (CPU the command's other threads need while it waits).
        with httpx.Client(timeout=2) as client:
            while True:
                if self.process.poll() is not None:
                    self.output.finished(timeout_s=1)
                    raise RuntimeError(
                        f"the temporary Prefect server exited with status "
                        f"{self.process.returncode} before it answered; its last line: "
                        f"{self.output.last_line()}")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                waited_s = time.monotonic() - self._launched
                if progress.idle_for() > stall_s:
                    raise RuntimeError(
                        f"the temporary Prefect server on {self.api_url} hangs: no CPU time "
                        f"used and its database untouched for {stall_s:.0f} s; its last "
                        f"line: {self.output.last_line()}")
                if waited_s > limit_s:
                    raise RuntimeError(
                        f"the temporary Prefect server did not answer {self.api_url} in "
                        f"{limit_s:.0f} s; its last line: {self.output.last_line()}")
                time.sleep(0.02)  # the flow starts when it answers: poll often
        if first:
            # Before any flow run: for the terminal only, not Prefect's API log handler.
            logger.info("Prefect's database is created (%.0f s)",
                        time.monotonic() - self._launched, extra={"send_to_api": False})
            self._release()

    def _release(self) -> None:
        if self._creation_lock is not None:
            self._creation_lock.release()
            self._creation_lock = None

    def stop(self) -> None:
        try:
            _stop(self.process)
        finally:
            self._release()


@contextlib.contextmanager
def temporary_api() -> Iterator[Callable[[], None]]:
    """Within the block, the Prefect API the command's flows use, and a function that waits
    until it answers (call it just before the flow). PREFECT_API_URL's server when set;
    otherwise a temporary local server launched on entry and stopped on exit."""
    # Launched first, before Prefect is imported, unless the environment names an API; a
    # profile that names one is known only once Prefect has read it, and then the launched
    # server is stopped unused.
    port = free_port()
    server = None if os.environ.get("PREFECT_API_URL") else _TemporaryServer(port)
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        PREFECT_UI_URL,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        if server is not None:
            server.stop()
        yield lambda: None
        return
    if server is None:  # the environment names an API that this process's settings, set in
        # code (a caller's temporary_settings), override with none
        server = _TemporaryServer(port)
    api_url = server.api_url
    logger.info("starting a temporary Prefect server on %s (set PREFECT_API_URL to use "
                "yours)", api_url)

    def wait_until_ready() -> None:
        server.wait_until_ready(
            stall_s=float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))

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
        server.stop()
