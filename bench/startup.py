"""What a flow command pays before its first step when no Prefect API is configured.

    .venv/bin/python -m bench.startup --runs 5 [--mnist ../shared/data/mnist]

The same flow, `ingest-mnist` on the same files into the same warm cache, run two ways, each a
fresh process timed from start to exit, alternating so noise hits both alike:
- `cli`: `mlpaint data fetch`, which launches Prefect's temporary server itself as soon as it
  knows it will run a flow (flows/prefect_api.py);
- `python`: the flow called from Python, where Prefect's client starts that server when the
  flow begins (it imports Prefect's server into the process first, then launches it).
Both run with PREFECT_API_URL unset and PREFECT_HOME in a folder of the benchmark's own,
migrated by a first, untimed run of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench.services import timed_run

logger = logging.getLogger("bench.startup")

REPO = Path(__file__).resolve().parents[1]


def _commands(mnist: Path, cache: Path) -> dict[str, list[str]]:
    called = ("import sys; from flows.ingest import ingest_mnist; "
              "from mlpaint.data.fetch import IngestSpec; "
              f"ingest_mnist(IngestSpec(sources=[{str(mnist)!r}]), cache_dir={str(cache)!r})")
    return {"cli": [str(Path(sys.executable).parent / "mlpaint"), "data", "fetch", "--source",
                    str(mnist), "--cache-dir", str(cache), "--json"],
            "python": [sys.executable, "-c", called]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared/data/mnist")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="mlpaint-bench-") as workdir:
        env = {**os.environ, "PREFECT_HOME": str(Path(workdir) / "prefect"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        commands = _commands(args.mnist, Path(workdir) / "cache")
        for command in commands.values():  # fills the cache, migrates Prefect's database
            timed_run(command, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for run in range(args.runs):
            for name, command in commands.items():
                times[name].append(timed_run(command, env).seconds)
            logger.info("run %d: %s", run + 1,
                        ", ".join(f"{name} {t[-1]:.2f} s" for name, t in times.items()))
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({"runs": args.runs, "seconds": times, "medians": medians,
                      "saved_seconds": medians["python"] - medians["cli"]}, indent=1))


if __name__ == "__main__":
    main()
