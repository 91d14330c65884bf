"""A Dask scheduler and one worker, each its own process, the worker set up as if on another
machine: its own working directory, HOME and cache, and no view of the flow's cache."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from mlpaint.processes import free_port, start_service, stop_service


@contextlib.contextmanager
def dask_cluster(root: Path, worker_env: dict[str, str]) -> Iterator[tuple[str, int, Path]]:
    """Start them under `root` (logs, the worker's home), the worker with `worker_env` on
    top of its own; yield the scheduler's address, the worker's process group and its
    home."""
    home = root / "worker-home"
    home.mkdir()
    bin_dir = os.path.dirname(sys.executable)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "HOME": str(home),
           "MLPAINT_CACHE_DIR": str(home / "cache"), "PREFECT_HOME": str(home / "prefect"),
           **worker_env}
    dask = os.path.join(bin_dir, "dask")
    port, scheduler_http, worker_http = free_port(), free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start_service(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", f"127.0.0.1:{scheduler_http}"],
        f"http://127.0.0.1:{scheduler_http}/health", log=root / "scheduler.log")
    try:
        worker = start_service(
            [dask, "worker", address, "--nworkers", "1", "--nthreads", "2",
             "--local-directory", str(home / "dask"),
             "--dashboard-address", f"127.0.0.1:{worker_http}"],
            f"http://127.0.0.1:{worker_http}/health", env=env, log=root / "worker.log",
            cwd=home)
        try:
            yield address, worker.pid, home
        finally:
            stop_service(worker)
    finally:
        stop_service(scheduler)
