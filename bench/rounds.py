"""Fold models scored at several round counts, and the cost of a round: how the champion's
configuration was chosen.

Each fit named is a fold model a training run stored (`<cache>/fits/<key>/`), trained with
the champion spec's MLDB split; it is scored after 300 … 800 of its rounds on that fold's
held-out MNIST rows (`rowHash() % 5 = 0`) and on the drawn test set (the pen drawings of the
writers no model trains on). The official test set is not read: this is how the champion's
configuration is chosen.

    .venv/bin/mlpaint train --spec champion --no-final-fit --cache-dir C [--algorithms A]
    .venv/bin/python -m bench.rounds --cache-dir C --fit KEY [--fit KEY …]
    .venv/bin/python -m bench.rounds --cache-dir C --time-rounds 15
    .venv/bin/python -m bench.rounds --cache-dir C --compare FIRST_FIT SECOND_FIT

`--time-rounds N`: seconds per boosting round on the champion's final-fit rows (MNIST's
training rows, their augmented copies and the pen renderings in the cache) with the packaged
champion's parameters and with half-row bagging in place of its sampling, at 1 and 2
threads, variants interleaved; the first rounds (GOSS samples nothing before 1/rate of them)
are left out of the timing.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger("bench.rounds")
ROUNDS = (300, 400, 500, 600, 800)


def _one_folder(pattern: str, cache: Path) -> Path:
    found = sorted(cache.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"{cache}: expected one {pattern}, found {len(found)}")
    return found[0]


def score_at_rounds(cache: Path, fit_key: str) -> dict:
    import lightgbm as lgb

    train = _one_folder("features/*-train-moments-*-all", cache)
    pen = _one_folder("pen-matrices/*", cache)
    features, labels = np.load(train / "features.npy"), np.load(train / "labels.npy")
    held = (np.load(train / "row_hash.npy") % np.uint64(5)) == 0
    drawn, drawn_labels = np.load(pen / "drawn_features.npy"), np.load(pen / "drawn_labels.npy")
    fit = cache / "fits" / fit_key
    booster = lgb.Booster(model_file=str(fit / "model" / "booster-0.txt"))
    rounds_trained = booster.num_trees() // 10
    scores = []
    for rounds in (r for r in ROUNDS if r <= rounds_trained):
        read = booster.predict(features[held], num_iteration=rounds).argmax(axis=1)
        read_drawn = booster.predict(drawn, num_iteration=rounds).argmax(axis=1)
        per_digit = [float((read_drawn[drawn_labels == d] == d).mean()) for d in range(10)]
        scores.append({"rounds": rounds, "held_out": float((read == labels[held]).mean()),
                       "drawn": float((read_drawn == drawn_labels).mean()),
                       "drawn_worst_digit": min(per_digit), "drawn_per_digit": per_digit})
    fitted = json.loads((fit / "fit.json").read_text())
    return {"fit": fit_key, "name": fitted["name"], "seconds": fitted["seconds"],
            "threads": fitted["threads"], "held_out_rows": int(held.sum()),
            "drawn_rows": len(drawn_labels), "scores": scores}


def compare_fits(cache: Path, first: Path, second: Path) -> dict:
    """Two stored final models side by side on the official test set and the drawn test set
    of `cache`, digit by digit, as the gate compares a candidate with the champion
    (mlpaint.training.evaluation.compare_paired)."""
    from dataclasses import asdict

    import lightgbm as lgb

    from mlpaint.training.evaluation import compare_paired

    test = _one_folder("features/*-test-moments-*-all", cache)
    pen = _one_folder("pen-matrices/*", cache)
    sets = {"official": (np.load(test / "features.npy"), np.load(test / "labels.npy")),
            "drawn": (np.load(pen / "drawn_features.npy"), np.load(pen / "drawn_labels.npy"))}
    boosters = [lgb.Booster(model_file=str(fit / "model" / "booster-0.txt"))
                for fit in (first, second)]
    result = {}
    for name, (features, labels) in sets.items():
        right = [booster.predict(features).argmax(axis=1) == labels for booster in boosters]
        result[name] = {"first_accuracy": float(right[0].mean()),
                        "second_accuracy": float(right[1].mean()),
                        **asdict(compare_paired(right[0], right[1]))}
        logger.info("%s: %.4f against %.4f; right only with the first %d, only with the "
                    "second %d; p = %.2f", name, right[0].mean(), right[1].mean(),
                    result[name]["right_only_first"], result[name]["right_only_second"],
                    result[name]["p_value"])
    return result


BAGGING = {"bagging_fraction": 0.5, "bagging_freq": 1}  # the sampling the champion had


def time_rounds(cache: Path, rounds: int) -> list[dict]:
    import time

    import lightgbm as lgb

    from mlpaint.training.algorithms import lightgbm_params, load_algorithms

    train = _one_folder("features/*-train-moments-*-all", cache)
    augmented = _one_folder("augmented/*", cache)
    pen = _one_folder("pen-matrices/*", cache)
    features = np.concatenate([np.load(train / "features.npy"),
                               np.load(augmented / "features.npy"),
                               np.load(pen / "train_features.npy")])
    labels = np.concatenate([np.load(train / "labels.npy"), np.load(augmented / "labels.npy"),
                             np.load(pen / "train_labels.npy")])
    shipped = dict(load_algorithms()["champion"].params)
    bagged = {k: v for k, v in shipped.items()
              if k not in ("data_sample_strategy", "top_rate", "other_rate")} | BAGGING
    skip = 10  # past GOSS's unsampled start (1 / learning rate rounds)
    results = []
    for threads in (1, 2):
        for name, params in (("shipped", shipped), ("bagging 0.5", bagged)):
            full = lightgbm_params(params, seed=0, num_threads=threads)
            dataset = lgb.Dataset(features, labels, params=full).construct()
            started = time.perf_counter()
            lgb.train(full, dataset, num_boost_round=skip)
            warm = time.perf_counter()
            lgb.train(full, dataset, num_boost_round=skip + rounds)
            done = time.perf_counter()
            per_round = ((done - warm) - (warm - started)) / rounds
            results.append({"sampling": name, "threads": threads, "rows": len(labels),
                            "seconds_per_round": round(per_round, 3)})
            logger.info("%s, %d thread(s), %d rows: %.3f s a round", name, threads,
                        len(labels), per_round)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--fit", action="append", default=[], metavar="KEY")
    parser.add_argument("--time-rounds", type=int, metavar="N",
                        help="time N rounds of each sampling instead")
    parser.add_argument("--compare", nargs=2, type=Path, metavar="FIT_FOLDER",
                        help="two stored final fits (`<cache>/fits/<key>`, from any cache) "
                             "side by side on this cache's test sets")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.compare:
        logger.info(json.dumps(compare_fits(args.cache_dir, *args.compare)))
    if args.time_rounds:
        logger.info(json.dumps(time_rounds(args.cache_dir, args.time_rounds)))
    for key in args.fit:
        result = score_at_rounds(args.cache_dir, key)
        logger.info(json.dumps(result))
        for row in result["scores"]:
            logger.info("%s %s rounds %d: held-out %.4f, drawn %.4f, worst drawn digit %.3f",
                        key[:8], result["name"], row["rounds"], row["held_out"], row["drawn"],
                        row["drawn_worst_digit"])


if __name__ == "__main__":
    main()
