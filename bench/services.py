"""Running a command to its end, timed. (Services the benchmarks start and stop go through
mlpaint.processes, as the tests' do.)"""

from __future__ import annotations

import subprocess
import time


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
