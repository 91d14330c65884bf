"""Explanation benchmark: exact TreeSHAP of one model with LightGBM's pred_contrib, with
shap.TreeExplainer, and with mlpaint.model.treeshap (what serving and publishing run), in one run.

    .venv/bin/python -m bench.explain --model .mlpaint/bundles/versions/<version>/model \
        --rows 10000 --repeats 300

`--model` is a saved DigitModel folder: a published bundle's `model/`, or one that
`bench.train --part accuracy --save-models DIR` kept. Batch: each variant explains the first
`--rows` official test digits in its own subprocess (wall time, peak RSS): all ten classes
(`chosen-all`, every core) or each row for its own label only (`chosen-own-class`, what
publishing runs for the per-digit maps). Latency: `--repeats` different test digits, each
explained by every path in turn (interleaved), one thread: all ten digits through each path,
and the three and one digits the page shows first; medians and p99, and the speed-up of
each all-ten path over shap.TreeExplainer on the same model and rows.
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


def _test_set(model, mnist: Path, rows: int):
    """The first `rows` official test digits through the model's own feature stage."""
    from bench.train import _read_idx

    pixels = _read_idx(mnist / "t10k-images-idx3-ubyte.gz").reshape(-1, 784)[:rows]
    labels = _read_idx(mnist / "t10k-labels-idx1-ubyte.gz")[:rows]
    return model.features(pixels), labels


def _worker(variant: str, model_dir: Path, mnist: Path, rows: int) -> None:
    from mlpaint.model.explain import ClassExplainer
    from mlpaint.training.algorithms import DigitModel

    model = DigitModel.load(model_dir)
    features, labels = _test_set(model, mnist, rows)
    booster = model.boosters[0]
    if variant == "tree-explainer":
        import shap

        explainer = shap.TreeExplainer(booster)
    elif variant in {"chosen-own-class", "chosen-all"}:
        explainer = ClassExplainer(model)  # every core, as publishing runs it
        explainer.explain(features[:1], [0])  # flatten the trees, load the kernel
    start = time.perf_counter()
    if variant == "pred-contrib":
        booster.predict(features, pred_contrib=True)
    elif variant == "tree-explainer":
        explainer.shap_values(features)
    elif variant == "chosen-all":
        explainer.explain(features, list(range(10)))
    else:
        explainer.explain_own_class(features, labels)
    seconds = time.perf_counter() - start
    print(json.dumps({"variant": variant, "rows": rows, "seconds": seconds,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _latency(model_dir: Path, mnist: Path, repeats: int) -> dict:
    """Per drawing: `repeats` different test digits, each explained by every path in turn
    (interleaved, so the machine's noise falls on all of them alike), one thread each."""
    import shap

    from mlpaint.model.explain import ClassExplainer
    from mlpaint.training.algorithms import DigitModel

    model = DigitModel.load(model_dir)
    booster = model.boosters[0]
    features, _ = _test_set(model, mnist, repeats)
    tree_explainer = shap.TreeExplainer(booster)
    class_explainer = ClassExplainer(model, parallel=False)  # as the server runs it
    top3 = np.argsort(model.raw_scores(features), axis=1)[:, ::-1][:, :3]
    every = list(range(10))
    paths = {
        "pred-contrib, 10 digits": lambda i: booster.predict(features[i:i + 1],
                                                             pred_contrib=True, num_threads=1),
        "tree-explainer, 10 digits": lambda i: tree_explainer.shap_values(features[i:i + 1]),
        "mlpaint treeshap, 10 digits": lambda i: class_explainer.explain(features[i:i + 1],
                                                                        every),
        "mlpaint treeshap, top 3 digits": lambda i: class_explainer.explain(
            features[i:i + 1], list(top3[i])),
        "mlpaint treeshap, top 1 digit": lambda i: class_explainer.explain(
            features[i:i + 1], list(top3[i, :1])),
    }
    for call in paths.values():
        call(0)  # warm: the compiled kernel, shap's tree conversion
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(repeats):
        for name, call in paths.items():
            start = time.perf_counter()
            call(i)
            times[name].append((time.perf_counter() - start) * 1000)
    results = {}
    for name, measured in times.items():
        measured.sort()
        results[name] = {"median_ms": round(statistics.median(measured), 3),
                         "p99_ms": round(measured[min(len(measured) - 1,
                                                      int(0.99 * len(measured)))], 3)}
        print(name, results[name], flush=True)
    shap_ms = results["tree-explainer, 10 digits"]["median_ms"]
    for name in ("pred-contrib, 10 digits", "mlpaint treeshap, 10 digits"):
        results[name]["speedup_vs_tree_explainer"] = round(shap_ms / results[name]["median_ms"],
                                                           2)
    print("speed-up over shap.TreeExplainer (medians, 10 digits):",
          {name: results[name]["speedup_vs_tree_explainer"]
           for name in ("pred-contrib, 10 digits", "mlpaint treeshap, 10 digits")}, flush=True)
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
    for variant in ("pred-contrib", "tree-explainer", "chosen-all", "chosen-own-class"):
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
