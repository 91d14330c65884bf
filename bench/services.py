"""Running a command to its end, timed. (Services the benchmarks start and stop go through
mlpaint.processes, as the tests' do.)"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import NamedTuple


class TimedRun(NamedTuple):
    seconds: float
    stdout: str


def timed_run(command: list[str], env: dict[str, str], *, timeout_s: float | None = 600,
              cwd: Path | None = None) -> TimedRun:
    """Wall seconds and standard output of `command` run to its end (None: no time limit);
    raise with the tail of its stderr if it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False, cwd=cwd)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return TimedRun(seconds, done.stdout)
