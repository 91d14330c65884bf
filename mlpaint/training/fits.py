"""Fitting an experiment's models: one per fold and the final one, each scored, stored in the
catalog's store (`fits/<key>`) under a key of everything it depends on, and reused from
there by a rerun or retry, on whichever machine they run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlpaint.data.integrity import IntegrityError
from mlpaint.model.feature_stages import FeatureStage
from mlpaint.storage.catalog import FITS, Catalog, local_folder
from mlpaint.tracking import RegisteredModel, peak_rss_megabytes
from mlpaint.training.algorithms import (
    BaggedBoostingConfig,
    Continuation,
    GbdtConfig,
    train_model,
)
from mlpaint.training.confidence import (
    ConfidenceChoice,
    ConfidenceFigures,
    choose_threshold,
    figures_at,
    top_and_right,
)
from mlpaint.training.evaluation import Aggregate, Evaluation, LabelStatistics, evaluate
from mlpaint.training.keys import final_fit_key, fold_fit_key
from mlpaint.training.matrices import (
    AugmentedMatrix,
    FeatureMatrix,
    FeedbackMatrix,
    PenMatrix,
    with_augmented,
)
from mlpaint.training.progress import CurvePoint, FitMonitor, FitStoppedError, ProgressWatcher
from mlpaint.training.spec import ExperimentSpec, fold_sides, plan_folds
from mlpaint.training.warm_start import WarmStartBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    name: str  # "fold-0", …, or "final"
    location: str  # URI of the finished fit's folder in the store: `model/`, `fit.json`
    evaluation: Evaluation
    train_evaluation: Evaluation | None
    train_rows: int
    test_rows: int
    seconds: float
    worker: str  # host:pid that ran the fit (a Dask worker, or the flow's own process)
    wild_evaluation: Evaluation | None = None  # on the feedback's wild test set, if any
    feedback_rows: int = 0  # of train_rows, how many came from feedback
    reused: bool = False  # taken from an earlier run's finished fit, not trained now
    threads: int = 0  # LightGBM threads it trained with (0: stored before this was recorded)
    # Peak resident memory of the process that trained it, a Dask worker's included.
    peak_rss_mb: float = 0.0
    drawn_evaluation: Evaluation | None = None  # on the drawn test set (held-out writers)
    drawn_writer_accuracy: dict[str, float] | None = None  # per held-out writer
    pen_rows: int = 0  # of train_rows, how many were pen renderings (and their copies)
    # A fold's, on its held-out writers' pen renderings (those on its testing side).
    heldout_drawn_evaluation: Evaluation | None = None
    # The watched rows' score as it trained (mlpaint.training.progress): a fold's held-out
    # rows, the final model's official test set, or each bag's own held-out rows.
    curve: tuple[CurvePoint, ...] = ()

    def model_folder(self) -> Path:
        """This machine's verified copy of the model (downloaded once from a remote store)."""
        return local_folder(self.location) / MODEL

    def to_json(self) -> dict:
        """Everything but where the model is and whether it was reused: what a later run
        needs to reuse this fit."""
        return {"name": self.name, "evaluation": asdict(self.evaluation),
                "train_evaluation": asdict(self.train_evaluation)
                if self.train_evaluation else None,
                "wild_evaluation": asdict(self.wild_evaluation)
                if self.wild_evaluation else None,
                "train_rows": self.train_rows, "test_rows": self.test_rows,
                "seconds": self.seconds, "worker": self.worker,
                "feedback_rows": self.feedback_rows, "threads": self.threads,
                "peak_rss_mb": self.peak_rss_mb,
                "drawn_evaluation": asdict(self.drawn_evaluation)
                if self.drawn_evaluation else None,
                "drawn_writer_accuracy": self.drawn_writer_accuracy,
                "pen_rows": self.pen_rows,
                "heldout_drawn_evaluation": asdict(self.heldout_drawn_evaluation)
                if self.heldout_drawn_evaluation else None,
                "curve": [point.to_json() for point in self.curve]}

    @classmethod
    def from_json(cls, data: dict, location: str) -> FitResult:
        def evaluation(doc: dict | None) -> Evaluation | None:
            if doc is None:
                return None
            return Evaluation(**{**doc, "labels": [LabelStatistics(**s)
                                                   for s in doc["labels"]]})

        return cls(data["name"], location, evaluation(data["evaluation"]),
                   evaluation(data["train_evaluation"]), data["train_rows"],
                   data["test_rows"], data["seconds"], data["worker"],
                   evaluation(data["wild_evaluation"]), data["feedback_rows"],
                   threads=data.get("threads", 0),
                   peak_rss_mb=data.get("peak_rss_mb", 0.0),
                   drawn_evaluation=evaluation(data.get("drawn_evaluation")),
                   drawn_writer_accuracy=data.get("drawn_writer_accuracy"),
                   pen_rows=data.get("pen_rows", 0),
                   heldout_drawn_evaluation=evaluation(data.get("heldout_drawn_evaluation")),
                   curve=tuple(CurvePoint(**point) for point in data.get("curve", [])))

    def confidence_rows(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        """Per drawing of `part`, `heldout` (a fold's held-out writers) or `drawn` (the
        drawn test set): the top probability and whether the top digit was right; empty
        when the fit scored none."""
        return read_confidence_rows(local_folder(self.location) / CONFIDENCE_ROWS, part)


def read_confidence_rows(path: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """`part`'s top probabilities and right answers as a fit stored them at `path`; empty
    when it stored none (no such file, or a fit that scored the drawn test set but held out
    no writer's drawings: one trained without pen renderings)."""
    empty = np.zeros(0, np.float64), np.zeros(0, bool)
    if not path.is_file():
        return empty
    with np.load(path) as rows:
        if f"{part}_top" not in rows.files:
            return empty
        return rows[f"{part}_top"], rows[f"{part}_right"]


def _pen_training_rows(pen: PenMatrix, folds, fold_index: int | None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The pen rows a fit trains on: for a fold, those of the writers its rule puts on the
    training side (a writer's digits share its hash, so none is on both sides); for the
    final model, all of them."""
    features, labels, row_hash = pen.load_train()
    if fold_index is None:
        return features, labels
    chosen = fold_sides(folds, row_hash)[fold_index].train_rows
    return features[chosen], labels[chosen]


@dataclass(frozen=True)
class HeldOutDrawings:
    """A fold's held-out writers' pen rows: drawings by people its model never saw, as the
    drawn test set is for the final model. `rendered` marks the renderings; the rest are
    their augmented copies."""

    features: np.ndarray
    labels: np.ndarray
    rendered: np.ndarray


def _pen_heldout_rows(pen: PenMatrix, folds, fold_index: int) -> HeldOutDrawings:
    """The pen rows of the writers fold `fold_index` holds out (its testing side)."""
    features, labels, row_hash = pen.load_train()
    chosen = fold_sides(folds, row_hash)[fold_index].test_rows
    return HeldOutDrawings(features[chosen], labels[chosen], chosen < pen.rendered_rows)


def _with_extra_rows(train: tuple[np.ndarray, np.ndarray],
                     extra: list[tuple[np.ndarray, np.ndarray, float]]
                     ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray | None]:
    """`train` plus each extra part's rows, and the weights (None when all are 1)."""
    parts = [(f, y, w) for f, y, w in extra if len(y)]
    if not parts:
        return train, None
    weights = np.concatenate([np.ones(len(train[1]), np.float32),
                              *(np.full(len(y), w, np.float32) for _, y, w in parts)])
    return ((np.concatenate([train[0], *(f for f, _, _ in parts)]),
             np.concatenate([train[1], *(y for _, y, _ in parts)])),
            None if (weights == 1).all() else weights)


def _per_writer_accuracy(labels: np.ndarray, predicted: np.ndarray, writers: np.ndarray
                         ) -> dict[str, float]:
    return {str(w): float((predicted[writers == w] == labels[writers == w]).mean())
            for w in np.unique(writers).tolist()}


def _fit_and_evaluate(name: str, algorithm: str, config: GbdtConfig | BaggedBoostingConfig,
                     train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                     *, feature_stage: FeatureStage, seed: int, threads: int, eval_train: bool,
                     fit_dir: Path, feedback: FeedbackMatrix | None = None,
                     pen: PenMatrix | None = None,
                     pen_train: tuple[np.ndarray, np.ndarray] | None = None,
                     pen_heldout: HeldOutDrawings | None = None,
                     test_name: str = "held-out rows",
                     watchers: Sequence[ProgressWatcher] = (),
                     should_stop: Callable[[], bool] | None = None,
                     continuation: Continuation | None = None) -> FitResult:
    """Train on `train` plus the feedback's training rows and `pen_train` (each weighted as
    its source says), score on `test`, on the feedback's wild test set, on the pen's drawn
    test set and on `pen_heldout`'s renderings (a fold's held-out writers). The model goes
    to `fit_dir/model`; the top probability and rightness of each drawing of the drawn test
    set (to measure the "not sure" threshold on) and of each `pen_heldout` row (to choose
    it on) to `fit_dir/CONFIDENCE_ROWS`. `watchers` hear of its progress every few rounds,
    with the score on `test` (`test_name`, in words) as it trains; once `should_stop`
    answers true it raises `FitStoppedError` at its next round. Given a `continuation`, the fit
    grows that model instead of starting from nothing."""
    extra, feedback_rows, pen_rows = [], 0, 0
    if feedback is not None and feedback.train_rows:
        features, labels = feedback.load_train()
        extra.append((features, labels, feedback.weight))
        feedback_rows = len(labels)
    if pen is not None and pen_train is not None:
        extra.append((*pen_train, pen.weight))
        pen_rows = len(pen_train[1])
    train, weights = _with_extra_rows(train, extra)
    if should_stop is not None and should_stop():
        # A fit that was still queued when its run ended.
        raise FitStoppedError(f"{name}: not started: its run is ending")
    logger.info("%s: training %s on %d rows (%d from feedback, %d pen renderings) with %d "
                "thread(s)%s", name, algorithm, len(train[1]), feedback_rows, pen_rows, threads,
                f", {continuation.rounds} rounds on top of a model of "
                f"{sum(continuation.model.rounds)}" if continuation else "")
    monitor = FitMonitor(name, continuation.rounds if continuation else config.total_rounds,
                         watchers,
                         watched=test_name if isinstance(config, GbdtConfig)
                         else "each bag's held-out rows", should_stop=should_stop)
    start = time.perf_counter()
    model = train_model(algorithm, config, train[0], train[1], feature_stage=feature_stage,
                        seed=seed, num_threads=threads, weights=weights, monitor=monitor,
                        watched_rows=test, continuation=continuation)
    seconds = time.perf_counter() - start
    # Scored with the fit's own thread count. LightGBM keeps its thread count in one
    # process-wide setting that every call with parameters overwrites: a prediction on
    # "every core" would switch the fits still training beside this one to every core
    # too, until the next fit starts, and four threads would then fight over two cores.
    evaluation = evaluate(test[1], model.predict_proba(test[0], num_threads=threads))
    train_evaluation = (evaluate(train[1], model.predict_proba(train[0], num_threads=threads))
                        if eval_train else None)
    wild_evaluation = drawn_evaluation = drawn_writers = heldout_evaluation = None
    confidence_rows = {}
    if feedback is not None and feedback.wild_rows:
        wild_features, wild_labels = feedback.load_wild()
        wild_evaluation = evaluate(wild_labels, model.predict_proba(wild_features,
                                                                    num_threads=threads))
    if pen is not None and pen.drawn_rows:
        drawn_features, drawn_labels, writers = pen.load_drawn()
        probabilities = model.predict_proba(drawn_features, num_threads=threads)
        drawn_evaluation = evaluate(drawn_labels, probabilities)
        drawn_writers = _per_writer_accuracy(drawn_labels, probabilities.argmax(axis=1),
                                             writers)
        confidence_rows["drawn"] = top_and_right(drawn_labels, probabilities)
    if pen_heldout is not None and pen_heldout.rendered.any():
        probabilities = model.predict_proba(pen_heldout.features, num_threads=threads)
        heldout_evaluation = evaluate(pen_heldout.labels[pen_heldout.rendered],
                                      probabilities[pen_heldout.rendered])
        # Chosen on the copies too: a fold holds out a few writers, whose styles may be
        # easier than those of the people who will draw; the copies, moved and distorted,
        # stand in for the styles they do not show.
        confidence_rows["heldout"] = top_and_right(pen_heldout.labels, probabilities)
    model.save(fit_dir / MODEL)
    if confidence_rows:
        np.savez(fit_dir / CONFIDENCE_ROWS, **{
            f"{part}_{name}": array for part, (top, right) in confidence_rows.items()
            for name, array in (("top", top), ("right", right))})
    logger.info("%s: accuracy %.4f on %d rows%s%s%s (fit %.1f s)", name, evaluation.accuracy,
                evaluation.rows, f", {wild_evaluation.accuracy:.4f} on {wild_evaluation.rows} "
                f"wild rows" if wild_evaluation else "",
                f", {drawn_evaluation.accuracy:.4f} on {drawn_evaluation.rows} drawn rows"
                if drawn_evaluation else "",
                f", {heldout_evaluation.accuracy:.4f} on {heldout_evaluation.rows} drawings "
                f"of its held-out writers" if heldout_evaluation else "", seconds)
    return FitResult(name, "", evaluation, train_evaluation, len(train[1]),
                     len(test[1]), seconds, f"{socket.gethostname()}:{os.getpid()}",
                     wild_evaluation, feedback_rows, threads=threads,
                     peak_rss_mb=round(peak_rss_megabytes(), 1),
                     drawn_evaluation=drawn_evaluation, drawn_writer_accuracy=drawn_writers,
                     pen_rows=pen_rows, heldout_drawn_evaluation=heldout_evaluation,
                     curve=tuple(monitor.curve))


MODEL, FIT_RECORD, CONFIDENCE_ROWS = "model", "fit.json", "confidence_rows.npz"


def _fold_key(spec: ExperimentSpec, config: GbdtConfig | BaggedBoostingConfig, fold_index: int,
              matrix: FeatureMatrix, augmented: AugmentedMatrix | None,
              feedback: FeedbackMatrix | None, pen: PenMatrix | None) -> str:
    return fold_fit_key(spec, config, fold_index, [
        matrix.folder, *(m.folder for m in (augmented, feedback, pen) if m is not None)])


def _final_key(spec: ExperimentSpec, config: GbdtConfig | BaggedBoostingConfig,
               train_matrix: FeatureMatrix, test_matrix: FeatureMatrix,
               augmented: AugmentedMatrix | None, feedback: FeedbackMatrix | None,
               pen: PenMatrix | None, base: WarmStartBase | None) -> str:
    return final_fit_key(spec, config, [
        train_matrix.folder, test_matrix.folder,
        *(m.folder for m in (augmented, feedback, pen) if m is not None)],
        base.location if base else None)


def fits_to_train(spec: ExperimentSpec, config: GbdtConfig | BaggedBoostingConfig,
                  n_folds: int, catalog: Catalog, train_matrix: FeatureMatrix,
                  test_matrix: FeatureMatrix, augmented: AugmentedMatrix | None,
                  feedback: FeedbackMatrix | None, pen: PenMatrix | None = None,
                  base: WarmStartBase | None = None) -> int:
    """How many of this experiment's fits have no finished fit stored to reuse."""
    keys = [_fold_key(spec, config, i, train_matrix, augmented, feedback, pen)
            for i in range(n_folds)]
    if spec.final_fit:
        keys.append(_final_key(spec, config, train_matrix, test_matrix, augmented, feedback,
                               pen, base))
    return sum(not catalog.is_finished(catalog.location(FITS, key)) for key in keys)


def _reuse_or_fit(key: str, catalog: Catalog, fit) -> FitResult:
    """The finished fit stored under `key`, or `fit(staging)` run now and stored there. A
    rerun of a killed or failed experiment, or a retry, thus redoes only the fits that had
    not finished. The folder appears whole (its manifest is written last), so a fit killed
    halfway leaves nothing to reuse; its files are checked against the manifest's hashes,
    so a damaged one is trained again rather than registered."""
    location = catalog.location(FITS, key)
    if catalog.is_finished(location):
        try:
            stored = json.loads((local_folder(location) / FIT_RECORD).read_text())
        except IntegrityError as exc:
            logger.warning("%s; training it again", exc)
            catalog.remove(location)
        else:
            result = FitResult.from_json(stored, location)
            logger.info("%s: reusing the finished fit %s (accuracy %.4f)", result.name, key,
                        result.evaluation.accuracy)
            return dataclasses.replace(result, reused=True)
    with catalog.staging(location) as staging:
        result = fit(staging)
        (staging / FIT_RECORD).write_text(json.dumps(result.to_json()))
        catalog.finish(staging, location)
    return dataclasses.replace(result, location=location)


def fit_fold(matrix: FeatureMatrix, spec: ExperimentSpec,
             config: GbdtConfig | BaggedBoostingConfig, fold_index: int, threads: int,
             catalog: Catalog, augmented: AugmentedMatrix | None = None,
             feedback: FeedbackMatrix | None = None,
             pen: PenMatrix | None = None,
             watchers: Sequence[ProgressWatcher] = (),
             should_stop: Callable[[], bool] | None = None) -> FitResult:
    """One model on one fold's training rows (plus the augmented copies of those rows, the
    feedback's training rows and the pen renderings of the fold's training writers),
    evaluated on its testing rows, the wild set and the drawn test set; reused from the
    store when this very fit has finished before. `watchers` hear of its progress;
    `should_stop` stops it (`FitStoppedError`)."""
    name = f"fold-{fold_index}"

    def fit(staging: Path) -> FitResult:
        features, labels, row_hash = matrix.load()
        plan = plan_folds(spec.folds, row_hash)[fold_index]
        train = with_augmented((np.asarray(features[plan.train_rows]),
                                labels[plan.train_rows]), plan.train_rows, augmented)
        test = (np.asarray(features[plan.test_rows]), labels[plan.test_rows])
        return _fit_and_evaluate(name, spec.algorithm, config, train, test,
                                feature_stage=spec.features, seed=spec.seed + fold_index,
                                threads=threads, eval_train=spec.eval_train,
                                fit_dir=staging, feedback=feedback, pen=pen,
                                pen_train=_pen_training_rows(pen, spec.folds, fold_index)
                                if pen is not None else None,
                                pen_heldout=_pen_heldout_rows(pen, spec.folds, fold_index)
                                if pen is not None else None, watchers=watchers,
                                should_stop=should_stop)

    return _reuse_or_fit(_fold_key(spec, config, fold_index, matrix, augmented, feedback,
                                   pen), catalog, fit)


def fit_final(train_matrix: FeatureMatrix, test_matrix: FeatureMatrix, spec: ExperimentSpec,
              config: GbdtConfig | BaggedBoostingConfig, threads: int,
              catalog: Catalog, augmented: AugmentedMatrix | None = None,
              feedback: FeedbackMatrix | None = None,
              pen: PenMatrix | None = None,
              watchers: Sequence[ProgressWatcher] = (),
              should_stop: Callable[[], bool] | None = None,
              base: WarmStartBase | None = None) -> FitResult:
    """One model on every training row (and every augmented copy, the feedback's training
    rows and every training writer's pen renderings), scored on the official test set, the
    wild set and the drawn test set; reused from the store when this very fit has finished
    before. `watchers` hear of its progress (its curve: the official test set's score, to
    watch, never to choose a round on); `should_stop` stops it. Given a `base`, the fit
    continues that model's boosting as `spec.warm_start` says."""
    def fit(staging: Path) -> FitResult:
        features, labels, _ = train_matrix.load()
        test_features, test_labels, _ = test_matrix.load()
        return _fit_and_evaluate(
            "final", spec.algorithm, config,
            with_augmented((np.asarray(features), labels), None, augmented),
            (np.asarray(test_features), test_labels), feature_stage=spec.features,
            seed=spec.seed, threads=threads, eval_train=spec.eval_train,
            fit_dir=staging, feedback=feedback, pen=pen,
            pen_train=_pen_training_rows(pen, spec.folds, None) if pen is not None else None,
            test_name="official test set", watchers=watchers, should_stop=should_stop,
            continuation=base.continuation(spec.warm_start) if base else None)

    return _reuse_or_fit(_final_key(spec, config, train_matrix, test_matrix, augmented,
                                    feedback, pen, base), catalog, fit)


def choose_low_confidence(folds: list[FitResult]) -> ConfidenceChoice | None:
    """The "not sure" threshold (mlpaint.training.confidence), chosen on every fold's
    held-out writers' drawings and their copies together; None when no fold scored any."""
    parts = [fold.confidence_rows("heldout") for fold in folds]
    top = np.concatenate([top for top, _ in parts])
    right = np.concatenate([right for _, right in parts])
    return choose_threshold(top, right) if top.size else None


def drawn_low_confidence(final: FitResult, threshold: float) -> ConfidenceFigures | None:
    """How `threshold` splits the final model's answers on the drawn test set: the measure
    of a threshold chosen without it."""
    top, right = final.confidence_rows("drawn")
    return figures_at(top, right, threshold) if top.size else None


@dataclass(frozen=True)
class ExperimentSummary:
    parent_run_id: str
    folds: list[FitResult]
    aggregated: dict[str, Aggregate]
    final: FitResult | None
    registered: RegisteredModel | None
    publication: dict | None = None  # the publish flow's report, when it ran
    feedback: FeedbackMatrix | None = None  # the feedback snapshot it trained with
    pen: PenMatrix | None = None  # the pen drawings it trained and was scored on
    # The "not sure" threshold as the folds' held-out writers chose it (None: no fold scored
    # pen drawings), the one the final model carries (chosen so, its base's, the spec's;
    # None: the model's default), and its figures on the drawn test set.
    low_confidence: ConfidenceChoice | None = None
    low_confidence_below: float | None = None
    drawn_low_confidence: ConfidenceFigures | None = None
    warm_start: WarmStartBase | None = None  # the registered model the final one continued

    def to_json(self) -> dict:
        def fit_json(result: FitResult) -> dict:
            return {"name": result.name, "reused": result.reused,
                    "train_rows": result.train_rows,
                    "test_rows": result.test_rows, "fit_seconds": round(result.seconds, 3),
                    "fit_threads": result.threads, "peak_rss_mb": result.peak_rss_mb,
                    "worker": result.worker,
                    "feedback_rows": result.feedback_rows,
                    "statistics": result.evaluation.to_json(),
                    "wild_statistics": (result.wild_evaluation.to_json()
                                        if result.wild_evaluation else None),
                    "pen_rows": result.pen_rows,
                    "drawn_statistics": (result.drawn_evaluation.to_json()
                                         if result.drawn_evaluation else None),
                    "drawn_writer_accuracy": result.drawn_writer_accuracy,
                    "heldout_drawn_statistics": (result.heldout_drawn_evaluation.to_json()
                                                 if result.heldout_drawn_evaluation
                                                 else None),
                    "train_statistics": (result.train_evaluation.to_json()
                                         if result.train_evaluation else None)}

        return {
            "mlflow_run_id": self.parent_run_id,
            "folds": [fit_json(f) for f in self.folds],
            "aggregated": {name: asdict(a) for name, a in self.aggregated.items()},
            "test": fit_json(self.final) if self.final else None,
            "registered_model": asdict(self.registered) if self.registered else None,
            "publication": self.publication,
            "wild": ({**self.feedback.to_json(), "statistics": (
                self.final.wild_evaluation.to_json()
                if self.final and self.final.wild_evaluation else None)}
                if self.feedback else None),
            "drawn": ({**self.pen.to_json(), "statistics": (
                self.final.drawn_evaluation.to_json()
                if self.final and self.final.drawn_evaluation else None)}
                if self.pen else None),
            # The threshold the final model carries; `chosen` only where folds chose it.
            "low_confidence": ({"below": self.low_confidence_below,
                                "chosen": asdict(self.low_confidence.figures)
                                if self.low_confidence else None,
                                "target_met": self.low_confidence.target_met
                                if self.low_confidence else None,
                                "drawn": asdict(self.drawn_low_confidence)
                                if self.drawn_low_confidence else None}
                               if self.low_confidence_below is not None else None),
            "warm_start": asdict(self.warm_start) if self.warm_start else None,
        }


def fit_threads(parallel_fits: int) -> int:
    """LightGBM threads per fit, so concurrent fits share the cores rather than fight."""
    return max(1, (os.cpu_count() or 1) // max(1, parallel_fits))
