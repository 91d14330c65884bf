"""The cost of watching a fit (mlpaint.training.progress): the same fit of the packaged `lgbm`
configuration on the same rows, trained bare and trained with a `FitMonitor` that scores the
official test set every round and reports to a log watcher, alternating, `--runs` times each.

    .venv/bin/python -m bench.progress --runs 3

The rows: the first `--rows` training digits through the default feature stage; the
watched rows: the 10,000 official test digits, as the final fit watches them. Medians and
their ratio are printed as JSON; the figure goes in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

from bench.train import _load
from mlpaint.model.features import apply_feature_stage
from mlpaint.training.algorithms import load_algorithms, train_model
from mlpaint.training.progress import EveryTenth, FitMonitor
from mlpaint.training.spec import ExperimentSpec

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.progress")


def measure(mnist: Path, rows: int, runs: int) -> dict:
    stage = ExperimentSpec().features
    config = load_algorithms()["lgbm"]
    train_x, train_y, test_x, test_y = _load(mnist)
    features = apply_feature_stage(stage, train_x[:rows])
    labels = train_y[:rows]
    watched = (apply_feature_stage(stage, test_x), test_y)
    threads = os.cpu_count() or 1
    seconds: dict[str, list[float]] = {"bare": [], "watched": []}
    for _ in range(runs):
        for kind in seconds:
            monitor = (FitMonitor("bench", config.total_rounds,
                                  [EveryTenth(lambda p: logger.info("%s", p.describe()))],
                                  watched="official test set")
                       if kind == "watched" else None)
            start = time.perf_counter()
            train_model("lgbm", config, features, labels, feature_stage=stage, seed=0,
                        num_threads=threads, monitor=monitor,
                        watched_rows=watched if monitor else None)
            seconds[kind].append(time.perf_counter() - start)
            logger.info("%s: %.1f s", kind, seconds[kind][-1])
    bare, watched_median = (statistics.median(seconds[k]) for k in ("bare", "watched"))
    return {"rows": rows, "watched_rows": len(test_y), "rounds": config.total_rounds,
            "threads": threads, "runs": runs, "seconds": seconds,
            "median_bare_s": round(bare, 2), "median_watched_s": round(watched_median, 2),
            "watched_over_bare": round(watched_median / bare, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared/data/mnist")
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logger.info("%s", json.dumps(measure(args.mnist, args.rows, args.runs)))


if __name__ == "__main__":
    main()
