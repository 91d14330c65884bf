"""How long `infra/stack.sh up` takes on this machine: PostgreSQL, the Prefect server, the work
pool, the MLflow server, a worker, Prometheus, the deployments and the automations.

    .venv/bin/python -m bench.stack --runs 3

Each run starts the stack twice in a folder of its own, on free ports: first on a new folder
(PostgreSQL's `initdb`, both servers creating their schemas), then again after `down` (the
state kept, as an operator's restart). `up` returns once both servers answer, the worker is
started, and the deployments and automations are registered. Medians are quoted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.services import timed_run
from mlpaint.processes import free_port

logger = logging.getLogger("bench.stack")
REPO = Path(__file__).resolve().parents[1]


def stack_env(state: Path) -> dict[str, str]:
    """This process's environment for `infra/stack.sh` with its state in `state` and every
    server on a free port, not pointed at any other server."""
    env = {**os.environ, "MLPAINT_STACK_DIR": str(state),
           "PREFECT_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()),
           "PG_PORT": str(free_port()), "PROMETHEUS_PORT": str(free_port())}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run(runs: int) -> dict:
    script = str(REPO / "infra" / "stack.sh")
    times: dict[str, list[float]] = {"new_folder": [], "restart": []}
    for _ in range(runs):
        # Not under a private temporary folder: PostgreSQL runs as `postgres` when root.
        state = Path(tempfile.mkdtemp(prefix="mlpaint-bench-stack-"))
        state.chmod(0o711)
        env = stack_env(state)
        try:
            times["new_folder"].append(timed_run([script, "up"], env).seconds)
            timed_run([script, "down"], env)
            times["restart"].append(timed_run([script, "up"], env).seconds)
        finally:
            subprocess.run([script, "down"], env=env, capture_output=True, timeout=300)
            shutil.rmtree(state, ignore_errors=True)
        logger.info("%s", times)
    return {"runs": runs, "seconds": {k: [round(v, 1) for v in vs] for k, vs in times.items()},
            "medians": {k: round(statistics.median(vs), 1) for k, vs in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(run(args.runs), indent=1))


if __name__ == "__main__":
    main()
