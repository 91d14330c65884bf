"""Warm-start benchmark: what the feedback trigger's run costs and gives on full MNIST.

    .venv/bin/python -m bench.warm_start --workdir /tmp/warm               # champion base
    .venv/bin/python -m bench.warm_start --workdir /tmp/warm --base default

Everything runs in `--workdir`: its own cache, SQLite MLflow store, bundle folder and
feedback store, MNIST read from `--mnist`.

1. **The base**: `mlpaint train --spec champion` (or the default spec, what `make run`
   trains) with `--publish-to`, so it is the registry's `champion`. Kept in the workdir: a
   second invocation with the same workdir reuses it (its fits are stored; the run is then
   quick and publishes nothing new).
2. **Corrections**: `--corrections` drawings as the page draws them (mlpaint.images.drawing) of the
   pen trajectories of training writers, rendered anew with a seed no training rendering
   uses, so none is a drawing any model trained on; the base's wrong answers first, then
   the rest, stored as people's corrections (label, the base's answer) in a feedback store.
3. **Warm starts**, each `mlpaint train --spec champion --warm-start champion
   --feedback-store … --publish-to …` timed as a command, from its start to its exit
   (fetch, features, augmented rows, the fit, registering, explaining the whole official
   test set, the gate, the bundle): `cold` in a new cache (the champion spec's augmented
   rows made anew), then `warm` in the base's cache (they are stored there). The registry's
   champion is set back to the base between the two, so both continue the same model.

Reported: the wall seconds of each run, the base's and each candidate's official test and
drawn test accuracy (their worst digit too), how many corrections each reads right (those
it trained on and those of the wild set apart), and the gate's decision.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from bench.robustness import pen_table
from bench.train import mlpaint_train

logger = logging.getLogger("bench.warm_start")
REPO = Path(__file__).resolve().parents[1]
#: Training renders pen digits with the spec's seed (0); this one draws new renderings.
CORRECTIONS_SEED = 9001


def _scores(report: dict) -> dict:
    test = report["test"]
    drawn = test["drawn_statistics"]
    return {"test_accuracy": test["statistics"]["accuracy"],
            "drawn_accuracy": drawn["accuracy"] if drawn else None,
            "drawn_worst_digit": min(label["recall"] for label in drawn["labels"])
            if drawn and drawn.get("labels") else None,
            "fit_seconds": test["fit_seconds"], "train_rows": test["train_rows"]}


def write_corrections(store_folder: Path, model, count: int) -> dict:
    """`count` new renderings of training writers' pen digits as corrections of `model`'s
    answers: its wrong answers first."""
    from mlpaint.feedback.store import FeedbackRecord, FeedbackStore
    from mlpaint.images.drawing import DRAWN_TEST_STYLE, drawn_test_rows, render_rows

    table = pen_table(None)
    training_rows = np.setdiff1d(np.arange(len(table)), drawn_test_rows(table, 0.2))
    pixels, source = render_rows(table, training_rows, renderings=1, style=DRAWN_TEST_STYLE,
                                 seed=CORRECTIONS_SEED)
    labels = table.labels[source].astype(int)
    answers = model.predict_pixels(pixels).argmax(axis=1)
    wrong = np.flatnonzero(answers != labels)
    chosen = np.concatenate([wrong, np.flatnonzero(answers == labels)])[:count]
    store = FeedbackStore.at(str(store_folder))
    ids = []
    for row in chosen.tolist():
        record = FeedbackRecord.new(label=int(labels[row]), pixels=pixels[row],
                                    answered_digit=int(answers[row]))
        store.add(record)
        ids.append(record.id)
    return {"records": len(chosen), "base_wrong": int(min(len(wrong), count)),
            "pixels": pixels[chosen], "labels": labels[chosen], "ids": ids}


def _read_right(model, corrections: dict, wild_share: float) -> dict:
    """The share of the corrections `model` reads as their labels: those a warm start
    trained on, and those its wild test set kept out (by the rule training uses)."""
    from mlpaint.feedback.store import feedback_row_hashes, wild_rows

    right = model.predict_pixels(corrections["pixels"]).argmax(axis=1) == corrections["labels"]
    wild = wild_rows(feedback_row_hashes(corrections["ids"]), wild_share)
    return {"trained_on": round(float(right[~wild].mean()), 4), "trained_rows": int((~wild).sum()),
            "wild": round(float(right[wild].mean()), 4) if wild.any() else None,
            "wild_rows": int(wild.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--base", choices=["champion", "default"], default="champion")
    parser.add_argument("--corrections", type=int, default=100)
    parser.add_argument("--rounds", type=int, help="warm_start.rounds (default: the spec's)")
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared/data/mnist")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from mlflow import MlflowClient

    from mlpaint.publishing.bundle import load_bundle
    from mlpaint.tracking.publication import load_registered_model
    from mlpaint.training.spec import load_spec

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    base_cache, bundles = workdir / "cache", workdir / "bundles"
    source = ["--source", str(args.mnist)]
    seconds, base = mlpaint_train([*source, "--spec", args.base, "--publish-to",
                                   str(bundles)], workdir, base_cache)
    result = {"base": {"spec": args.base, "wall_seconds": round(seconds, 1),
                       "reused": base["test"]["reused"], **_scores(base)}}
    logger.info("base: %s", result["base"])
    base_version = base["registered_model"]["version"]
    feedback = workdir / "feedback"
    if feedback.exists():
        raise SystemExit(f"{feedback} exists: start from a new --workdir, or remove it")
    base_model = load_bundle(str(bundles)).model()
    corrections = write_corrections(feedback, base_model, args.corrections)
    wild_share = load_spec("champion").feedback.wild_share
    result["corrections"] = {"records": corrections["records"],
                             "base_read_wrong": corrections["base_wrong"],
                             "base_read_right": _read_right(base_model, corrections,
                                                            wild_share)}
    warm_args = [*source, "--spec", "champion", "--warm-start", "champion",
                 "--feedback-store", str(feedback),
                 *(["--warm-start-rounds", str(args.rounds)] if args.rounds else [])]
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    for name, cache in (("cold", workdir / "cache-cold"), ("warm", base_cache)):
        client.set_registered_model_alias("mnist-digits", "champion", base_version)
        destination = workdir / f"bundles-{name}"
        seconds, report = mlpaint_train([*warm_args, "--publish-to", str(destination)],
                                        workdir, cache)
        gate = report["publication"]["gate"]
        result[name] = {"wall_seconds": round(seconds, 1), **_scores(report),
                        "gate_promoted": gate["promote"], "gate_reason": gate["reason"],
                        "corrections_read_right": _read_right(load_registered_model(
                            "mnist-digits", report["registered_model"]["version"],
                            tracking_uri), corrections, wild_share)}
        logger.info("%s: %s", name, result[name])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
