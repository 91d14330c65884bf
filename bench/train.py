"""Training benchmark on full MNIST, 2 cores.

    .venv/bin/python -m bench.train --part accuracy   # lgbm and bbdt_d5: raw, deskew, moments
    .venv/bin/python -m bench.train --part default    # `mlpaint train` as the README runs it
    .venv/bin/python -m bench.train --part ratio      # flow vs bare LightGBM, 5 folds + final
    .venv/bin/python -m bench.train --part ratio --prefect-server-port 4299
                                      # the same, the flow on a running `prefect server start`
    .venv/bin/python -m bench.train --part sweep      # how lgbm's parameters were chosen
    .venv/bin/python -m bench.train --part size       # accuracy vs explanation cost
    .venv/bin/python -m bench.train --part champion --candidate c2-800
                                      # a champion candidate: held-out and redrawn digits
    .venv/bin/python -m bench.train --part champion --candidate shipped \
        --params '{"extra_trees": true}'  # the weekly champion with other LightGBM settings
    .venv/bin/python -m bench.train --part champion-time --workdir /tmp/champion-time --warm
                                      # the weekly champion cold (and warm), beside the same
                                      # spec with its fold
    .venv/bin/python -m bench.train --part resume --runs 2
                                      # a rerun after a crash at the last fold vs a full run
    .venv/bin/python -m bench.train --part maps   # extra feature maps aligned with the pixels
    .venv/bin/python -m bench.train --part params # LightGBM settings over the champion's

`accuracy`: for each algorithm and feature stage, one fit on the 60,000 training rows, scored
on the official 10,000-row test set; wall time of the fit alone.
`default`: the whole `mlpaint train` command on its defaults (MLDB's 80/20 split plus the
final fit), MNIST read from a moto S3 server on loopback, MLflow in a temporary SQLite store.
`sweep`: the LightGBM settings tried for `lgbm`, official-test accuracy by round count.
`size`: smaller tree shapes for `lgbm`, trained on MLDB's 80% split of the training rows;
accuracy on the 20% held out by round count, and the cost of exactly explaining one digit
(TreeSHAP grows with trees x leaves x depth squared), to pick a model that explains fast
without losing accuracy. The official test set is kept for `accuracy`.
`champion`: one candidate of CHAMPION_CANDIDATES (augmentation + LightGBM settings), or
`shipped` (the packaged champion spec and algorithm, read from mlpaint/configs) or
`shipped-default` (the default spec and `lgbm`, what `make run` trains), `--params` on top
of its LightGBM settings; trained
on MLDB's 80% of the training rows and their augmented copies; every 200 rounds, accuracy on
the held-out 20% and on `--digits` of those held-out digits redrawn by bench/robustness.py's
generator, and the time to explain one digit for all ten classes. No official test digit is
read: the champion is chosen without it.
`maps`: whether feature maps aligned with the pixels (so an explanation could still be summed
per pixel) help the default tree shape: the deskewed digit alone, plus its 3x3 mean, plus its
Sobel gradients; 300 rounds on 20,000 of MLDB's 80% of the training rows, one thread each,
two at a time, scored on the held-out 20%.
`params`: a quick screen of LightGBM settings over the champion's (PARAM_VARIANTS, alone or
joined by "+"), on the `moments` stage without augmentation, 20,000 of MLDB's 80% of the
training rows, scored on the held-out 20%.
`champion-time`: the weekly champion as its deployment trains and publishes it, cold, one
after the other with the same spec and its MLDB fold (what it was before it trained the final
model alone), and warm with `--warm`; wall time, peak memory and each model's figures.
`resume`: `mlpaint train --folds 5` on full MNIST three ways in one cache: cold (nothing
cached; once, as it fills the cache), then `--runs` times each full (the data stages cached,
no fit: a run from scratch on a machine that has the data) and resumed (every fit cached but
the last fold's, which is removed: the state a run killed while the last fold trained
leaves), alternating. Medians, and the resumed run's share of the full run's wall time.
`ratio`: `mlpaint train --folds 5 --augment-copies 0` against a bare script that does the
same work — parse the IDX files, the same feature stage, the same six fits with the same
parameters, threads and concurrency, the same predictions — with nothing else: no Prefect,
no MLflow, no checks. Both are timed as commands, from the interpreter's start to its exit.
The two alternate, `--runs` times each; medians are quoted. By
default the flow starts and stops Prefect's temporary local server itself, as `mlpaint
train` does on a fresh machine; `--prefect-server-port` runs it against `prefect server
start` instead, as deployed and scheduled runs are.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from bench.services import timed_run
from mlpaint.processes import start_service, stop_service
from mlpaint.training.spec import default_spec_text

logger = logging.getLogger("bench.train")
REPO = Path(__file__).resolve().parents[1]


def _read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load(mnist: Path):
    train_x = _read_idx(mnist / "train-images-idx3-ubyte.gz").reshape(-1, 784)
    train_y = _read_idx(mnist / "train-labels-idx1-ubyte.gz")
    test_x = _read_idx(mnist / "t10k-images-idx3-ubyte.gz").reshape(-1, 784)
    test_y = _read_idx(mnist / "t10k-labels-idx1-ubyte.gz")
    return train_x, train_y, test_x, test_y


def _mldb_held_out(rows: int) -> np.ndarray:
    """MLDB's held-out 20% of the training rows as a mask: the default spec's testing_where
    (`rowHash() % 5 = 0`), evaluated by the rule training itself uses."""
    from mlpaint.data.dataset import row_hashes, row_keys
    from mlpaint.data.pins import Split
    from mlpaint.training.spec import MldbFolds

    _, testing = MldbFolds().rules()
    return testing.mask(row_hashes(row_keys(Split.TRAIN, rows)))


def part_accuracy(mnist: Path, save_dir: Path | None) -> list[dict]:
    from mlpaint.model.features import apply_feature_stage
    from mlpaint.training.algorithms import load_algorithms, train_model

    algorithms = load_algorithms()
    train_x, train_y, test_x, test_y = _load(mnist)
    rows = []
    for name, stage in (("lgbm", "raw"), ("lgbm", "deskew"), ("lgbm", "moments"),
                        ("bbdt_d5", "raw"), ("bbdt_d5", "deskew"), ("bbdt_d5", "moments")):
        features, test_features = (apply_feature_stage(stage, train_x),
                                   apply_feature_stage(stage, test_x))
        start = time.perf_counter()
        model = train_model(name, algorithms[name], features, train_y, feature_stage=stage,
                            seed=0, num_threads=os.cpu_count() or 1)
        seconds = time.perf_counter() - start
        accuracy = float((model.predict_proba(test_features).argmax(1) == test_y).mean())
        if save_dir:
            model.save(save_dir / f"{name}-{stage}")
        rows.append({"algorithm": name, "features": stage, "fit_seconds": round(seconds, 1),
                     "test_accuracy": accuracy, "rounds": model.rounds})
        logger.info("%s", rows[-1])
    return rows


SWEEP = {  # LightGBM parameters tried for `lgbm` on deskewed digits, beside the shared ones
    "31 leaves, 50% features": {"num_leaves": 31, "learning_rate": 0.1, "feature_fraction": 0.5},
    "63 leaves, 50% features": {"num_leaves": 63, "learning_rate": 0.1, "feature_fraction": 0.5},
    "31 leaves, lr 0.15, 30% features": {"num_leaves": 31, "learning_rate": 0.15,
                                         "feature_fraction": 0.3},
    "63 leaves, 30% features (chosen)": {"num_leaves": 63, "learning_rate": 0.1,
                                         "feature_fraction": 0.3},
    "127 leaves, 30% features, min 10": {"num_leaves": 127, "learning_rate": 0.1,
                                         "feature_fraction": 0.3, "min_data_in_leaf": 10},
}


def part_sweep(mnist: Path, rounds: int) -> list[dict]:
    """Official-test accuracy after 200..`rounds` rounds for each SWEEP setting."""
    import lightgbm as lgb

    from mlpaint.model.features import apply_feature_stage
    from mlpaint.training.algorithms import lightgbm_params

    train_x, train_y, test_x, test_y = _load(mnist)
    features, test_features = (apply_feature_stage("deskew", train_x),
                               apply_feature_stage("deskew", test_x))
    shared = {"min_data_in_leaf": 20, "lambda_l2": 1.0, "bagging_fraction": 0.8,
              "bagging_freq": 1, "max_bin": 63}
    rows = []
    for name, extra in SWEEP.items():
        params = lightgbm_params({**shared, **extra}, seed=0, num_threads=os.cpu_count() or 1)
        start = time.perf_counter()
        booster = lgb.train(params, lgb.Dataset(features, train_y, params=params),
                            num_boost_round=rounds)
        seconds = time.perf_counter() - start
        accuracy = {n: float((booster.predict(test_features, num_iteration=n).argmax(1)
                              == test_y).mean()) for n in range(200, rounds + 1, 50)}
        rows.append({"setting": name, "fit_seconds": round(seconds, 1), "accuracy": accuracy})
        logger.info("%s", rows[-1])
    return rows


SIZES = {  # tree shapes tried for `lgbm`, beside the shared settings; (params, max rounds)
    "63 leaves, lr 0.1 (the first default)": ({"num_leaves": 63, "learning_rate": 0.1}, 400),
    "31 leaves, lr 0.1": ({"num_leaves": 31, "learning_rate": 0.1}, 600),
    "depth 6, 63 leaves, lr 0.1": ({"max_depth": 6, "num_leaves": 63,
                                    "learning_rate": 0.1}, 600),
    "depth 5, 31 leaves, lr 0.15": ({"max_depth": 5, "num_leaves": 31,
                                     "learning_rate": 0.15}, 800),
    "15 leaves, lr 0.2": ({"num_leaves": 15, "learning_rate": 0.2}, 800),
    "15 leaves, lr 0.3": ({"num_leaves": 15, "learning_rate": 0.3}, 400),
    "7 leaves, lr 0.3": ({"num_leaves": 7, "learning_rate": 0.3}, 600),
}


def _one_row_latency_ms(booster, row: np.ndarray, classes: list[int], repeats: int) -> float:
    """Median time to explain one row for `classes` through the serving path."""
    from mlpaint.model.explain import ClassExplainer
    from mlpaint.training.algorithms import DigitModel

    explainer = ClassExplainer(DigitModel([booster], algorithm="lgbm", rounds=[0],
                                          feature_stage="deskew"), parallel=False)
    explainer.explain(row, classes)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        explainer.explain(row, classes)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 2)


def _fit_with_checkpoints(params: dict, x: np.ndarray, y: np.ndarray, rounds: int, *,
                          every: int) -> tuple[float, list]:
    """One fit of `rounds` rounds on every core; its wall time, and the model cut after
    every `every` rounds, as (rounds, booster) pairs."""
    import lightgbm as lgb

    from mlpaint.training.algorithms import lightgbm_params

    full = lightgbm_params(params, seed=0, num_threads=os.cpu_count() or 1)
    start = time.perf_counter()
    booster = lgb.train(full, lgb.Dataset(x, y, params=full), num_boost_round=rounds)
    seconds = time.perf_counter() - start
    return seconds, [(n, lgb.Booster(model_str=booster.model_to_string(num_iteration=n)))
                     for n in range(every, rounds + 1, every)]


def part_size(mnist: Path, repeats: int) -> list[dict]:
    """Held-out accuracy and one-row explanation latency by round count, per SIZES shape."""

    from mlpaint.model.features import apply_feature_stage

    train_x, train_y, _, _ = _load(mnist)
    features = apply_feature_stage("deskew", train_x)
    held_out = _mldb_held_out(len(train_y))
    x, y, vx, vy = features[~held_out], train_y[~held_out], features[held_out], train_y[held_out]
    shared = {"min_data_in_leaf": 20, "lambda_l2": 1.0, "bagging_fraction": 0.8,
              "bagging_freq": 1, "max_bin": 63, "feature_fraction": 0.3}
    rows = []
    for name, (extra, rounds) in SIZES.items():
        seconds, cuts = _fit_with_checkpoints({**shared, **extra}, x, y, rounds, every=100)
        by_rounds = {}
        for n, cut in cuts:
            by_rounds[n] = {
                "held_out_accuracy": float((cut.predict(vx).argmax(1) == vy).mean()),
                "explain_10_digits_ms": _one_row_latency_ms(cut, vx[:1], list(range(10)),
                                                            repeats),
                "explain_3_digits_ms": _one_row_latency_ms(cut, vx[:1], [0, 1, 2], repeats)}
        rows.append({"setting": name, "fit_seconds": round(seconds, 1), "by_rounds": by_rounds})
        logger.info("%s", rows[-1])
    return rows


_CHAMPION_SHARED = {"feature_fraction": 0.3, "bagging_fraction": 0.5, "bagging_freq": 1,
                    "min_data_in_leaf": 20, "lambda_l2": 1.0, "max_bin": 63}
# The packaged champion's tree shape and rate (mlpaint/configs/algorithms.yaml).
_SHIPPED_SHAPE = {**_CHAMPION_SHARED, "num_leaves": 15, "learning_rate": 0.2}
_MILD = {"elastic": {"probability": 1.0, "alpha": 20.0, "sigma": 4.0},
         "affine": {"probability": 1.0, "max_shift_px": 1.0, "max_rotation_deg": 8.0,
                    "scale_min": 0.9, "scale_max": 1.1, "max_shear_deg": 5.0},
         "stroke": {"probability": 0.5}, "as_drawn": {"probability": 0.0}}
CHAMPION_CANDIDATES = {  # name: (augment spec fields, LightGBM params, max rounds)
    "c3-31leaves": ({"copies": 3}, {**_CHAMPION_SHARED, "num_leaves": 31,
                                    "learning_rate": 0.15}, 1000),
    "c3-15leaves": ({"copies": 3}, _SHIPPED_SHAPE, 1200),
    # The shipped champion (2 copies, 400 rounds), longer, and on more copies.
    "c2-800": ({"copies": 2}, _SHIPPED_SHAPE, 800),
    "c4-400": ({"copies": 4}, _SHIPPED_SHAPE, 400),
    # The shipped champion with the "as drawn" pen widened from 0.06-0.22 of the digit's
    # height to 0.03-0.30: the page's 18 px pen on a digit drawn 60 to 270 px tall spans
    # 0.07-0.30, and the thin variation of bench/robustness.py (6-9 px on 190-230) 0.03-0.05.
    "c2-wide-pen": ({"copies": 2, "as_drawn": {"probability": 0.5, "min_stroke": 0.03,
                                               "max_stroke": 0.30}},
                    _SHIPPED_SHAPE, 400),
    # Copies moved as MNIST's own writers vary (milder moves, always an elastic field, no
    # re-drawn pen), and how many of them are re-drawn. `mild4-drawn15` is what
    # champion.yaml ships (so `--candidate shipped --features moments` trains it too).
    "mild4": ({**_MILD, "copies": 4}, _SHIPPED_SHAPE, 800),
    "mild4-drawn15": ({**_MILD, "copies": 4, "as_drawn": {"probability": 0.15}},
                      _SHIPPED_SHAPE, 800),
    "mild3-drawn15": ({**_MILD, "copies": 3, "as_drawn": {"probability": 0.15}},
                      _SHIPPED_SHAPE, 800),
}
# Packaged specs scored as they ship: name -> (spec file, algorithm in algorithms.yaml).
SHIPPED = {"shipped": ("champion.yaml", "champion"),
           "shipped-default": ("experiment.yaml", "lgbm")}


def part_champion(mnist: Path, candidate: str, digits: int, repeats: int,
                  features: str | None, params: dict | None = None) -> dict:
    """One champion candidate: trained on MLDB's 80% of the training digits plus its
    augmented copies (of those rows only), scored every 200 rounds on the held-out 20% and
    on those held-out digits redrawn by the robustness generator (bench/robustness.py), and
    on UCI's handwritten digits (other writers). The official test set is not read.
    `features` overrides the feature stage (a candidate's is `deskew` otherwise, a shipped
    spec's its own); `params` overrides LightGBM parameters."""

    from bench.robustness import decode_canvases, generate, real_handwriting, summarise
    from mlpaint.images.augment import AugmentSpec, augment
    from mlpaint.model.features import apply_feature_stage

    configs = REPO / "mlpaint/configs"
    if candidate in SHIPPED:  # exactly what the weekly deployment or `make run` trains
        spec_file, algorithm = SHIPPED[candidate]
        shipped = yaml.safe_load((configs / "algorithms.yaml").read_text())[algorithm]
        shipped_spec = yaml.safe_load((configs / spec_file).read_text())
        spec = AugmentSpec.model_validate(shipped_spec["augment"])
        lgbm_params, rounds = shipped["params"], shipped["rounds"]
        stage = features or shipped_spec["features"]
    else:
        augment_fields, lgbm_params, rounds = CHAMPION_CANDIDATES[candidate]
        base = yaml.safe_load((configs / "experiment.yaml").read_text())["augment"]
        spec = AugmentSpec.model_validate({**base, **augment_fields})
        stage = features or "deskew"
    lgbm_params = {**lgbm_params, **(params or {})}
    train_x, train_y, _, _ = _load(mnist)
    held_out = _mldb_held_out(len(train_y))
    start = time.perf_counter()
    copies, source = augment(train_x[~held_out], spec, seed=0)
    augment_seconds = time.perf_counter() - start
    x = apply_feature_stage(stage, np.concatenate([train_x[~held_out], copies]))
    y = np.concatenate([train_y[~held_out], train_y[~held_out][source]])
    del copies
    vx = apply_feature_stage(stage, train_x[held_out])
    vy = train_y[held_out]
    chosen = np.sort(np.random.default_rng(7).choice(len(vy), digits, replace=False))
    canvases = generate(train_x[held_out].reshape(-1, 28, 28), chosen, seed=7)
    decoded = {name: decode_canvases(pngs) for name, pngs in canvases.items()}
    real_canvases, real_labels = real_handwriting()
    real = [decode_canvases(pngs) for pngs in real_canvases.values()]
    real_x = apply_feature_stage(stage, np.concatenate([pixels for pixels, _ in real]))
    real_drawn = np.concatenate([drawn for _, drawn in real])
    real_y = np.tile(real_labels, len(real))

    fit_seconds, cuts = _fit_with_checkpoints(lgbm_params, x, y, rounds,
                                              every=min(200, rounds))
    by_rounds = {}
    for n, cut in cuts:
        drawn_scores = {}
        for name, (pixels, drawn) in decoded.items():
            probabilities = cut.predict(apply_feature_stage(stage, pixels))
            drawn_scores[name] = summarise(probabilities, vy[chosen], drawn,
                                           len(chosen))["accuracy"]
        by_rounds[n] = {
            "held_out_accuracy": float((cut.predict(vx).argmax(1) == vy).mean()),
            "drawn_overall": float(np.mean(list(drawn_scores.values()))),
            "drawn_worst": min(drawn_scores, key=drawn_scores.get),
            # Handwriting not by MNIST's writers (UCI's, both enlargements): the as-drawn
            # copies are drawn like the redrawn digits are, so they can flatter those.
            "uci_overall": summarise(cut.predict(real_x), real_y, real_drawn,
                                     len(real_y))["accuracy"],
            "drawn": drawn_scores,
            "explain_10_digits_ms": _one_row_latency_ms(cut, vx[:1], list(range(10)), repeats)}
        logger.info("%s @ %d rounds: %s", candidate, n, by_rounds[n])
    return {"candidate": candidate, "features": stage, "augment": spec.model_dump(),
            "params": lgbm_params,
            "train_rows": len(y), "augment_seconds": round(augment_seconds, 1),
            "fit_seconds": round(fit_seconds, 1), "by_rounds": by_rounds}


def _feature_maps(deskewed: np.ndarray, kind: str) -> np.ndarray:
    """The deskewed digits (n, 28, 28) as model rows, with extra maps of the same grid."""
    from scipy import ndimage

    maps = [deskewed]
    if kind == "mean3x3":
        maps.append(ndimage.uniform_filter(deskewed, size=(1, 3, 3), mode="constant"))
    elif kind == "sobel":
        maps += [ndimage.sobel(deskewed, axis=axis, mode="constant") for axis in (2, 1)]
    return np.hstack([m.reshape(len(m), -1) for m in maps]).astype(np.float32)


def part_maps(mnist: Path, rows: int = 20_000, rounds: int = 300) -> list[dict]:
    import lightgbm as lgb

    from mlpaint.model.features import apply_feature_stage
    from mlpaint.training.algorithms import lightgbm_params, load_algorithms

    train_x, train_y, _, _ = _load(mnist)
    held_out = _mldb_held_out(len(train_y))
    fit_rows = np.flatnonzero(~held_out)[:rows]
    deskewed = apply_feature_stage("deskew", train_x).reshape(-1, 28, 28)
    params = lightgbm_params(load_algorithms()["lgbm"].params, seed=0, num_threads=1)

    def one(kind: str) -> dict:
        features = _feature_maps(deskewed, kind)
        start = time.perf_counter()
        booster = lgb.train(params, lgb.Dataset(features[fit_rows], train_y[fit_rows]),
                            num_boost_round=rounds)
        seconds = time.perf_counter() - start
        accuracy = {n: float((booster.predict(features[held_out], num_iteration=n).argmax(1)
                              == train_y[held_out]).mean()) for n in (100, 200, rounds)}
        row = {"maps": kind, "features": features.shape[1], "fit_seconds": round(seconds, 1),
               "held_out_accuracy_by_rounds": accuracy}
        logger.info("%s", row)
        return row

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, ["pixels", "mean3x3", "sobel"]))


# LightGBM settings tried over the champion's (`--part params`), alone and combined with "+".
PARAM_VARIANTS = {
    "champion": {},
    "feature_fraction_bynode": {"feature_fraction": 1.0, "feature_fraction_bynode": 0.3},
    "feature_fraction_0.15": {"feature_fraction": 0.15},
    "feature_fraction_0.6": {"feature_fraction": 0.6},
    "max_bin_255": {"max_bin": 255},
    "min_data_in_leaf_5": {"min_data_in_leaf": 5},
    "min_data_in_leaf_60": {"min_data_in_leaf": 60},
    "lambda_l2_10": {"lambda_l2": 10.0},
    "extra_trees": {"extra_trees": True},
    "dart": {"boosting": "dart", "drop_rate": 0.1, "skip_drop": 0.5},
    "one_vs_rest": {"objective": "multiclassova"},
    "depth_5": {"num_leaves": 31, "max_depth": 5},
    "rate_0.1": {"learning_rate": 0.1},
    "goss": {"data_sample_strategy": "goss", "bagging_fraction": 1.0, "bagging_freq": 0},
}
DEFAULT_PARAM_SCREEN = [
    *PARAM_VARIANTS, "extra_trees+one_vs_rest", "extra_trees+depth_5", "one_vs_rest+depth_5",
    "extra_trees+one_vs_rest+depth_5", "extra_trees+feature_fraction_0.15",
    "one_vs_rest+feature_fraction_0.15"]


def part_params(mnist: Path, variants: list[str], rows: int, rounds: int,
                seeds: list[int]) -> list[dict]:
    """The champion's LightGBM settings (mlpaint/configs/algorithms.yaml) with each variant
    on top, on the `moments` stage without augmentation: one fit per variant and seed on the
    first `rows` of MLDB's 80% of the training rows, one thread each, two at a time; held-out
    accuracy at four round counts. A quick screen: the same settings with another seed
    differ by about 0.1 points at 20,000 rows, and a variant that wins here must still win
    with augmentation (`--part champion --params`)."""
    import lightgbm as lgb

    from mlpaint.model.features import apply_feature_stage
    from mlpaint.training.algorithms import lightgbm_params, load_algorithms

    train_x, train_y, _, _ = _load(mnist)
    held_out = _mldb_held_out(len(train_y))
    fit_rows = np.flatnonzero(~held_out)[:rows]
    features = apply_feature_stage("moments", train_x)
    champion = load_algorithms()["champion"].params
    cuts = [rounds * quarter // 4 for quarter in (1, 2, 3, 4)]

    def one(job: tuple[str, int]) -> dict:
        name, seed = job
        params = dict(champion)
        for part in name.split("+"):
            params.update(PARAM_VARIANTS[part])
        full = lightgbm_params(params, seed=seed, num_threads=1)
        start = time.perf_counter()
        booster = lgb.train(full, lgb.Dataset(features[fit_rows], train_y[fit_rows],
                                              params=full), num_boost_round=rounds)
        seconds = time.perf_counter() - start
        accuracy = {n: round(100 * float((booster.predict(
            features[held_out], num_iteration=n, num_threads=1).argmax(1)
            == train_y[held_out]).mean()), 2) for n in cuts}
        leaves = sum(tree["num_leaves"] for tree in booster.dump_model()["tree_info"])
        row = {"variant": name, "seed": seed, "fit_seconds": round(seconds, 1),
               "leaves": leaves, "held_out_accuracy_by_rounds": accuracy}
        logger.info("%s", row)
        return row

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, [(name, seed) for name in variants for seed in seeds]))


def mlpaint_train(args: list[str], workdir: Path, cache: Path | None = None,
                  wrapper: list[str] = ()) -> tuple[float, dict]:
    """`mlpaint train ARGS --json` in `workdir` (its SQLite MLflow store, and its `cache`
    unless `cache` names another), timed as a command (run under `wrapper`, for instance
    `/usr/bin/time`); its wall seconds and report."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = [*wrapper, str(Path(sys.executable).parent / "mlpaint"), "train", *args,
               "--cache-dir", str(cache or workdir / "cache"), "--json"]
    run = timed_run(command, env, timeout_s=None, cwd=workdir)
    return run.seconds, json.loads(run.stdout)


def part_default(mnist: Path, port: int) -> dict:
    """`mlpaint train` on its defaults, reading MNIST from a moto S3 server on loopback."""
    import boto3

    from bench.ingest import _start_moto, use_moto

    use_moto(port)
    with tempfile.TemporaryDirectory(prefix="mlpaint-bench-") as workdir:
        moto = _start_moto(port, Path(workdir) / "moto.log")
        try:
            s3 = boto3.client("s3")
            s3.create_bucket(Bucket="bench-mnist")
            for path in sorted(mnist.glob("*.gz")):
                s3.upload_file(str(path), "bench-mnist", f"mnist/{path.name}")
            seconds, report = mlpaint_train(["--source", "s3://bench-mnist/mnist/"],
                                            Path(workdir))
        finally:
            stop_service(moto)
    result = {"wall_seconds": round(seconds, 1),
              "fold_accuracy": report["folds"][0]["statistics"]["accuracy"],
              "test_accuracy": report["test"]["statistics"]["accuracy"],
              "fit_seconds": [f["fit_seconds"] for f in report["folds"]]
              + [report["test"]["fit_seconds"]]}
    logger.info("%s", result)
    return result


# The packaged champion, and the same spec with the MLDB fold it trained beside its final
# model before (the fold scores held-out rows and chooses the "not sure" threshold).
CHAMPION_TIME_VARIANTS = {"champion": [], "champion with its fold": ["--folds", "mldb"]}


def part_champion_time(mnist: Path, workdir: Path, warm: bool) -> dict:
    """The weekly champion as the deployment runs it (`mlpaint train --spec champion
    --publish-to …`), each variant of CHAMPION_TIME_VARIANTS cold (a new folder: every data
    stage made anew) one after the other; with `warm`, the packaged one again in its folder
    with its fits and built bundles removed (features, augmented rows and pen drawings
    cached). Wall time and peak memory of each command, the ratio to the variant with its
    fold, and each model's figures."""
    import shutil

    def run(name: str, folder: Path) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        peak = folder / "peak-rss-kb"
        seconds, report = mlpaint_train(
            ["--spec", "champion", *CHAMPION_TIME_VARIANTS[name], "--source", str(mnist),
             "--publish-to", str(folder / "bundles")], folder,
            wrapper=["/usr/bin/time", "-o", str(peak), "-f", "%M"])
        final = report["test"]
        row = {"variant": name, "wall_seconds": round(seconds, 1),
               "peak_rss_gb": round(int(peak.read_text().split()[-1]) / 1e6, 2),
               "fit_seconds": {f["name"]: f["fit_seconds"]
                               for f in [*report["folds"], final]},
               "fit_threads": {f["name"]: f["fit_threads"] for f in [*report["folds"], final]},
               "test_accuracy": final["statistics"]["accuracy"],
               "drawn_accuracy": final["drawn_statistics"]["accuracy"],
               "drawn_per_digit": [label["recall"] for label in
                                   final["drawn_statistics"]["labels"]],
               "low_confidence": report["low_confidence"],
               "gate": report["publication"]["gate"]["reason"]}
        logger.info("%s", row)
        return row

    rows = [run(name, workdir / name.replace(" ", "-")) for name in CHAMPION_TIME_VARIANTS]
    if warm:
        folder = workdir / "champion"
        for stage in ("fits", "built-bundles"):
            shutil.rmtree(folder / "cache" / stage)
        rows.append({**run("champion", folder), "variant": "champion, warm"})
    cold, with_fold = rows[0], rows[1]
    return {"rows": rows, "cold_ratio_to_with_fold": round(
        cold["wall_seconds"] / with_fold["wall_seconds"], 3)}


def _remove_fit(cache: Path, name: str) -> None:
    """Remove the stored fit named `name` (`fold-4`, `final`) from a cache's finished fits."""
    import shutil

    stored = [folder for folder in (cache / "fits").iterdir()
              if (folder / "fit.json").is_file()
              and json.loads((folder / "fit.json").read_text())["name"] == name]
    if len(stored) != 1:
        raise RuntimeError(f"expected one stored {name} fit, found {len(stored)}")
    shutil.rmtree(stored[0])


def part_resume(mnist: Path, runs: int, folds: int) -> dict:
    """Cold, full and resumed `mlpaint train --folds K` wall times; see the module docstring."""
    import shutil

    args = ["--source", str(mnist), "--folds", str(folds)]
    times: dict[str, list[float]] = {"cold": [], "full": [], "resumed": []}
    with tempfile.TemporaryDirectory(prefix="mlpaint-bench-") as folder:
        workdir = Path(folder)
        seconds, _ = mlpaint_train(args, workdir)  # once: it fills the data stages' cache
        times["cold"].append(seconds)
        for _ in range(runs):
            shutil.rmtree(workdir / "cache" / "fits")
            seconds, report = mlpaint_train(args, workdir)
            assert not any(f["reused"] for f in report["folds"])
            times["full"].append(seconds)
            _remove_fit(workdir / "cache", f"fold-{folds - 1}")
            seconds, report = mlpaint_train(args, workdir)
            reused = [f["name"] for f in [*report["folds"], report["test"]] if f["reused"]]
            assert len(reused) == folds, reused  # all but the last fold
            times["resumed"].append(seconds)
            retrained_threads = report["folds"][-1]["fit_threads"]
            logger.info("%s", times)
    medians = {name: round(statistics.median(values), 1) for name, values in times.items()}
    result = {"runs": runs, "seconds": times, "medians": medians,
              "retrained_fold_threads": retrained_threads,
              "resumed_share_of_full": round(medians["resumed"] / medians["full"], 3),
              "resumed_share_of_cold": round(medians["resumed"] / medians["cold"], 3)}
    logger.info("%s", result)
    return result


def _bare_fits(mnist: Path, folds: int, stage: str) -> None:
    """The same fits as `mlpaint train --folds K --features STAGE`, with nothing around them:
    the bare script `_bare` runs as a command of its own."""
    import lightgbm as lgb

    from mlpaint.data.dataset import row_hashes, row_keys
    from mlpaint.data.pins import Split
    from mlpaint.model.features import apply_feature_stage
    from mlpaint.training.algorithms import lightgbm_params, load_algorithms
    from mlpaint.training.fits import fit_threads

    config = load_algorithms()["lgbm"]
    train_x, train_y, test_x, test_y = _load(mnist)
    features, test_features = apply_feature_stage(stage, train_x), apply_feature_stage(stage,
                                                                                       test_x)
    residue = row_hashes(row_keys(Split.TRAIN, len(train_y))) % np.uint64(folds)
    n_fits = folds + 1
    threads = fit_threads(min(n_fits, os.cpu_count() or 1))

    def fit(fold: int) -> float:
        started = time.monotonic()
        if fold < folds:
            train_rows = residue != np.uint64(fold)
            x, y, tx, ty = (features[train_rows], train_y[train_rows], features[~train_rows],
                            train_y[~train_rows])
        else:
            x, y, tx, ty = features, train_y, test_features, test_y
        params = lightgbm_params(config.params, seed=fold if fold < folds else 0,
                                 num_threads=threads)
        booster = lgb.train(params, lgb.Dataset(x, y, params=params),
                            num_boost_round=config.rounds)
        # Scored with the fit's threads, as the flow scores its fits (see fits.py).
        accuracy = float((booster.predict(tx, num_threads=threads).argmax(1) == ty).mean())
        logger.info("bare fit %s: %.1f s", fold, time.monotonic() - started)
        return accuracy

    # The final fit first, as the flow submits it.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        accuracies = list(pool.map(fit, [folds, *range(folds)]))
    logger.info("bare accuracies %s", accuracies)


def _bare(mnist: Path, folds: int, stage: str) -> float:
    """Wall seconds of the bare script as a command of its own, from the interpreter's start
    to its exit, as the flow's `mlpaint train` is timed: its imports count, as the flow's do."""
    code = (f"import logging; logging.basicConfig(level=logging.INFO); "
            f"from pathlib import Path; from bench.train import _bare_fits; "
            f"_bare_fits(Path({str(mnist)!r}), {folds}, {stage!r})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return timed_run([sys.executable, "-c", code], env, timeout_s=None).seconds


@contextlib.contextmanager
def _prefect_server(workdir: Path, port: int) -> Iterator[None]:
    """`prefect server start` on loopback, and PREFECT_API_URL pointing at it for the
    `mlpaint train` subprocesses, as a deployment's runs (or `make stack-up`) would have."""
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    url = f"http://127.0.0.1:{port}/api"
    server = start_service([str(Path(sys.executable).parent / "prefect"), "server", "start",
                            "--host", "127.0.0.1", "--port", str(port)], f"{url}/health",
                           log=workdir / "prefect-server.log", env=env)
    os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        stop_service(server)


def part_ratio(mnist: Path, runs: int, folds: int, stage: str, *,
               prefect_server_port: int | None = None) -> dict:
    """Flow against bare, alternating. With `prefect_server_port` the flow talks to a
    running `prefect server start` instead of starting Prefect's temporary server itself."""
    with contextlib.ExitStack() as stack:
        if prefect_server_port:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="mlpaint-bench-prefect-")))
            stack.enter_context(_prefect_server(workdir, prefect_server_port))
        return _ratio_runs(mnist, runs, folds, stage)


def _mnist_only_spec(folder: Path) -> Path:
    """The default spec training on MNIST's rows alone, as the bare script does: no pen
    renderings (the flow still draws and scores the drawn test set, its one extra piece of
    work, a few seconds)."""
    data = yaml.safe_load(default_spec_text())
    data["pen"] = {**(data.get("pen") or {}), "renderings": 0}
    path = folder / "mnist-only.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _ratio_runs(mnist: Path, runs: int, folds: int, stage: str) -> dict:
    flow_times, bare_times = [], []
    for run in range(runs):
        with tempfile.TemporaryDirectory(prefix="mlpaint-bench-") as workdir:
            # No augmented copies and no pen drawings: the bare script trains on the MNIST
            # rows alone.
            seconds, _ = mlpaint_train(["--spec", str(_mnist_only_spec(Path(workdir))),
                                        "--source", str(mnist), "--folds", str(folds),
                                        "--features", stage, "--augment-copies", "0"],
                                       Path(workdir))
        flow_times.append(seconds)
        bare_times.append(_bare(mnist, folds, stage))
        logger.info("run %d: flow %.1f s, bare %.1f s", run + 1, flow_times[-1], bare_times[-1])
    result = {"runs": runs, "flow_seconds": flow_times, "bare_seconds": bare_times,
              "ratio_of_medians": statistics.median(flow_times) / statistics.median(bare_times)}
    logger.info("%s", result)
    return result


def main() -> None:
    from mlpaint.model.features import FeatureStage

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["accuracy", "default", "ratio", "sweep", "size",
                                           "champion", "champion-time", "resume", "maps",
                                           "params"],
                        required=True)
    parser.add_argument("--candidate", choices=[*SHIPPED, *sorted(CHAMPION_CANDIDATES)],
                        help="with --part champion")
    parser.add_argument("--params", type=json.loads, metavar="JSON",
                        help="with --part champion: LightGBM parameters over the candidate's, "
                             'e.g. \'{"extra_trees": true, "objective": "multiclassova"}\'')
    parser.add_argument("--digits", type=int, default=1000,
                        help="with --part champion: held-out digits redrawn per variation")
    parser.add_argument("--rounds", type=int, default=400, help="with --part sweep, params")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_PARAM_SCREEN,
                        metavar="VARIANT[+VARIANT]",
                        help=f"with --part params: of {', '.join(PARAM_VARIANTS)}")
    parser.add_argument("--rows", type=int, default=20_000, help="with --part params")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="with --part params")
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared/data/mnist")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30,
                        help="with --part size: one-row explanations timed per point")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--features", choices=[stage.value for stage in FeatureStage],
                        help="the feature stage: with --part ratio (default deskew), or a "
                             "--part champion candidate's (default deskew; `shipped`: its "
                             "spec's)")
    parser.add_argument("--save-models", type=Path, metavar="DIR",
                        help="with --part accuracy: keep the trained models here")
    parser.add_argument("--port", type=int, default=50124, help="the moto S3 server's port")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="with --part champion-time: a new folder for the runs (kept)")
    parser.add_argument("--warm", action="store_true",
                        help="with --part champion-time: also the champion again, warm")
    parser.add_argument("--prefect-server-port", type=int, metavar="PORT",
                        help="with --part ratio: run the flow against `prefect server start` "
                             "on this port instead of Prefect's temporary server")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.part == "accuracy":
        result = part_accuracy(args.mnist, args.save_models)
    elif args.part == "sweep":
        result = part_sweep(args.mnist, args.rounds)
    elif args.part == "size":
        result = part_size(args.mnist, args.repeats)
    elif args.part == "champion":
        if not args.candidate:
            parser.error("--part champion needs --candidate")
        result = part_champion(args.mnist, args.candidate, args.digits, args.repeats,
                               args.features, args.params)
    elif args.part == "default":
        result = part_default(args.mnist, args.port)
    elif args.part == "maps":
        result = part_maps(args.mnist)
    elif args.part == "params":
        unknown = {part for name in args.variants for part in name.split("+")} - set(
            PARAM_VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}")
        result = part_params(args.mnist, args.variants, args.rows, args.rounds, args.seeds)
    elif args.part == "resume":
        result = part_resume(args.mnist, args.runs, args.folds)
    elif args.part == "champion-time":
        if args.workdir is None or args.workdir.exists():
            parser.error("--part champion-time needs a new --workdir")
        result = part_champion_time(args.mnist, args.workdir, args.warm)
    else:
        result = part_ratio(args.mnist, args.runs, args.folds, args.features or "deskew",
                            prefect_server_port=args.prefect_server_port)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
