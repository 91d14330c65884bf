"""Explanation benchmark: exact TreeSHAP of the default model with LightGBM's pred_contrib,
with shap.TreeExplainer, and with mlpaint's per-class path, in one run.

    .venv/bin/python -m bench.train --part accuracy --save-models /tmp/bench-models
    .venv/bin/python -m bench.explain --model /tmp/bench-models/lgbm-deskew --rows 1000

Batch: each variant explains the first `--rows` official test digits in its own subprocess
(wall time, peak RSS). `chosen-own-class` is what publishing runs for the per-digit maps: each
row explained for its own label only. Latency: one drawing (a test digit), repeated
`--repeats` times in this process: all ten digits through each path, and the three digits
the page shows first.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _test_set(mnist: Path, rows: int):
    from bench.train import _read_idx
    from mlpaint.features import apply_feature_stage

    pixels = _read_idx(mnist / "t10k-images-idx3-ubyte.gz").reshape(-1, 784)[:rows]
    labels = _read_idx(mnist / "t10k-labels-idx1-ubyte.gz")[:rows]
    return apply_feature_stage("deskew", pixels), labels


def _worker(variant: str, model_dir: Path, mnist: Path, rows: int) -> None:
    from mlpaint.explain import ClassExplainer
    from mlpaint.training.algorithms import DigitModel

    model = DigitModel.load(model_dir)
    features, labels = _test_set(mnist, rows)
    booster = model.boosters[0]
    if variant == "tree-explainer":
        import shap

        explainer = shap.TreeExplainer(booster)
    elif variant == "chosen-own-class":
        explainer = ClassExplainer(model)
        explainer.explain(features[:1], [0])  # build the per-class boosters before timing
    start = time.perf_counter()
    if variant == "pred-contrib":
        booster.predict(features, pred_contrib=True)
    elif variant == "tree-explainer":
        explainer.shap_values(features)
    else:
        explainer.explain_own_class(features, labels)
    seconds = time.perf_counter() - start
    print(json.dumps({"variant": variant, "rows": rows, "seconds": seconds,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _latency(model_dir: Path, mnist: Path, repeats: int) -> dict:
    import shap

    from mlpaint.explain import ClassExplainer
    from mlpaint.training.algorithms import DigitModel

    model = DigitModel.load(model_dir)
    booster = model.boosters[0]
    features, _ = _test_set(mnist, 1)
    tree_explainer = shap.TreeExplainer(booster)
    class_explainer = ClassExplainer(model)
    top3 = list(np.argsort(model.raw_scores(features)[0])[::-1][:3])
    paths = {
        "pred-contrib, 10 digits": lambda: booster.predict(features, pred_contrib=True),
        "tree-explainer, 10 digits": lambda: tree_explainer.shap_values(features),
        "per-class, 10 digits": lambda: class_explainer.explain(features, list(range(10))),
        "per-class, top 3 digits": lambda: class_explainer.explain(features, top3),
        "per-class, top 1 digit": lambda: class_explainer.explain(features, top3[:1]),
    }
    results = {}
    for name, call in paths.items():
        call()  # warm
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        results[name] = {"median_ms": round(statistics.median(times), 2),
                         "p99_ms": round(times[min(len(times) - 1,
                                                    int(0.99 * len(times)))], 2)}
        print(name, results[name], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a saved DigitModel folder")
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared/data/mnist")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.model, args.mnist, args.rows)
        return
    batch = []
    for variant in ("pred-contrib", "tree-explainer", "chosen-own-class"):
        completed = subprocess.run(
            [sys.executable, "-m", "bench.explain", "--worker", variant, "--model",
             str(args.model), "--mnist", str(args.mnist), "--rows", str(args.rows)],
            cwd=REPO, capture_output=True, text=True, check=True)
        batch.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        print(batch[-1], flush=True)
    latency = _latency(args.model, args.mnist, args.repeats)
    print(json.dumps({"batch": batch, "latency": latency}, indent=1))


if __name__ == "__main__":
    main()
