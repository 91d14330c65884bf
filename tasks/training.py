"""Prefect tasks for training experiments.

Compute tasks (features, fits) take and return file references and carry no retries: a fit
that failed will fail again. Tasks that talk to the MLflow tracking store retry, since that
is I/O that can fail and is safe to repeat.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from mlpaint.augment import AUGMENT_CODE_VERSION, AugmentSpec, augment, fold_training_rows
from mlpaint.data.catalog import N_CLASSES
from mlpaint.data.dataset import load_table
from mlpaint.data.explore import render_label_grid
from mlpaint.features import FeatureStage, apply_feature_stage
from mlpaint.feedback import FeedbackSnapshot, FeedbackStore, wild_rows
from mlpaint.locations import place_in_cache
from mlpaint.tracking import (
    FLOW_RUN_TAG,
    DatasetUse,
    RegisteredModel,
    end_open_runs,
    ensure_experiment,
    log_datasets,
    log_digit_model,
    mark_complete,
    peak_rss_megabytes,
    tracking_client,
    write_evaluation_artifacts,
)
from mlpaint.training.algorithms import (
    BaggedBoostingConfig,
    GbdtConfig,
    train_model,
)
from mlpaint.training.evaluation import Aggregate, Evaluation, LabelStatistics, evaluate
from mlpaint.training.spec import ExperimentSpec, FeedbackSpec, plan_folds
from tasks.retries import SERVICE_CALL_RETRIES


def _load_matrix(folder: Path, row_info: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (memory-mapped), labels, and a per-row array (`row_info`) from a folder."""
    return (np.load(folder / "features.npy", mmap_mode="r"), np.load(folder / "labels.npy"),
            np.load(folder / row_info))


@dataclass(frozen=True)
class FeatureMatrix:
    """A reference to features on disk: `features.npy` (float32), `labels.npy`,
    `row_hash.npy`."""

    folder: str
    rows: int
    stage: str

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _load_matrix(Path(self.folder), "row_hash.npy")


@task(name="prepare-features")
def prepare_features(table_dir: str, stage: FeatureStage, limit: int | None,
                     cache_dir: Path) -> FeatureMatrix:
    """Apply the feature stage to a split (its first `limit` rows), cached by table, stage
    and limit."""
    table_path = Path(table_dir)
    key = f"{table_path.parent.name}-{table_path.name}-{stage.value}-{limit or 'all'}"
    folder = cache_dir / "features" / key
    table = load_table(table_path)
    rows = min(limit, table.meta.rows) if limit else table.meta.rows
    if (folder / "features.npy").is_file():
        return FeatureMatrix(str(folder), rows, stage.value)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written beside its final place and renamed: a killed run leaves no half-written matrix.
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    np.save(staging / "features.npy", apply_feature_stage(stage, table.pixels[:rows]))
    np.save(staging / "labels.npy", np.asarray(table.labels[:rows]))
    np.save(staging / "row_hash.npy", np.asarray(table.row_hash[:rows]))
    place_in_cache(staging, folder, marker="features.npy")
    get_run_logger().info("%s features of %d %s rows in %s", stage.value, rows,
                          table.meta.split, folder)
    return FeatureMatrix(str(folder), rows, stage.value)


@dataclass(frozen=True)
class AugmentedMatrix:
    """A reference to augmented copies of a split's rows on disk: `features.npy` (float32,
    after the feature stage), `labels.npy`, and `source_row.npy`, the position of the row
    each copy was made from (so a fold takes only copies of its own training rows)."""

    folder: str
    rows: int

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _load_matrix(Path(self.folder), "source_row.npy")


def _augmented_key(table_path: Path, stage: FeatureStage, limit: int | None,
                   augment_spec: AugmentSpec, seed: int) -> str:
    material = json.dumps({"table": f"{table_path.parent.name}/{table_path.name}",
                           "stage": stage.value, "limit": limit, "seed": seed,
                           "augment": augment_spec.model_dump(mode="json"),
                           "code": AUGMENT_CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


@task(name="prepare-augmented-rows")
def prepare_augmented(table_dir: str, stage: FeatureStage, limit: int | None,
                      augment_spec: AugmentSpec, seed: int, cache_dir: Path) -> AugmentedMatrix:
    """Augmented copies of a split's (first `limit`) rows through the feature stage, cached
    by the table, the stage, the augmentation spec, the seed and the code's version."""
    table_path = Path(table_dir)
    key = _augmented_key(table_path, stage, limit, augment_spec, seed)
    folder = cache_dir / "augmented" / key
    table = load_table(table_path)
    rows = min(limit, table.meta.rows) if limit else table.meta.rows
    if (folder / "features.npy").is_file():
        return AugmentedMatrix(str(folder), rows * augment_spec.copies)
    logger = get_run_logger()
    start = time.perf_counter()
    pixels, source = augment(np.asarray(table.pixels[:rows]), augment_spec, seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    np.save(staging / "features.npy", apply_feature_stage(stage, pixels))
    np.save(staging / "labels.npy", np.asarray(table.labels[:rows])[source])
    np.save(staging / "source_row.npy", source)
    place_in_cache(staging, folder, marker="features.npy")
    logger.info("%d augmented copies of %d %s rows in %.1f s, in %s", augment_spec.copies,
                rows, table.meta.split, time.perf_counter() - start, folder)
    return AugmentedMatrix(str(folder), len(source))


def _with_augmented(train: tuple[np.ndarray, np.ndarray], train_rows: np.ndarray | None,
                    augmented: AugmentedMatrix | None) -> tuple[np.ndarray, np.ndarray]:
    """The training rows plus the augmented copies made from them (all copies when
    `train_rows` is None: the final model trains on every row)."""
    if augmented is None:
        return train
    features, labels, source = augmented.load()
    chosen = (np.arange(len(source)) if train_rows is None
              else fold_training_rows(train_rows, source))
    return (np.concatenate([train[0], np.asarray(features[chosen])]),
            np.concatenate([train[1], labels[chosen]]))


@dataclass(frozen=True)
class FeedbackMatrix:
    """A reference to a feedback snapshot through the feature stage, on disk:
    `train_features.npy`/`train_labels.npy` (the records outside the wild set, then their
    augmented copies) and `wild_features.npy`/`wild_labels.npy` (the wild test set, never
    trained on), plus `ids.json` naming the records of each part."""

    folder: str
    store: str
    digest: str
    train_records: int
    train_rows: int  # records plus augmented copies
    wild_rows: int
    rejected: int
    weight: float

    def load_train(self) -> tuple[np.ndarray, np.ndarray]:
        folder = Path(self.folder)
        return np.load(folder / "train_features.npy"), np.load(folder / "train_labels.npy")

    def load_wild(self) -> tuple[np.ndarray, np.ndarray]:
        folder = Path(self.folder)
        return np.load(folder / "wild_features.npy"), np.load(folder / "wild_labels.npy")

    @property
    def sample_grid(self) -> str:
        return str(Path(self.folder) / "sample-grid-feedback.png")

    def to_json(self) -> dict:
        return {"store": self.store, "digest": self.digest,
                "train_records": self.train_records, "train_rows": self.train_rows,
                "wild_rows": self.wild_rows, "rejected": self.rejected, "weight": self.weight}


@task(name="prepare-feedback", **SERVICE_CALL_RETRIES)
def prepare_feedback(feedback_spec: FeedbackSpec, stage: FeatureStage,
                     augment_spec: AugmentSpec, seed: int, cache_dir: Path) -> FeedbackMatrix:
    """Snapshot the feedback store's accepted records, split off the wild test set by row
    hash, augment the rest as MNIST's rows are, and apply the feature stage; cached by the
    snapshot's content and everything else that shapes the result."""
    logger = get_run_logger()
    snapshot = FeedbackSnapshot.of(FeedbackStore.at(feedback_spec.store))
    wild = wild_rows(snapshot.row_hash, feedback_spec.wild_share)
    material = json.dumps({"digest": snapshot.digest, "stage": stage.value, "seed": seed,
                           "wild_share": feedback_spec.wild_share,
                           "augment": augment_spec.model_dump(mode="json"),
                           "code": AUGMENT_CODE_VERSION}, sort_keys=True)
    key = hashlib.sha256(material.encode()).hexdigest()[:32]
    folder = cache_dir / "feedback" / key
    train_pixels, train_labels = snapshot.pixels[~wild], snapshot.labels[~wild]
    copies = augment_spec.copies if len(train_labels) else 0
    reference = FeedbackMatrix(str(folder), snapshot.store, snapshot.digest,
                               int((~wild).sum()), int((~wild).sum()) * (1 + copies),
                               int(wild.sum()), snapshot.rejected, feedback_spec.weight)
    if not (folder / "ids.json").is_file():
        if copies:
            extra_pixels, source = augment(train_pixels, augment_spec, seed)
            train_pixels = np.concatenate([train_pixels, extra_pixels])
            train_labels = np.concatenate([train_labels, train_labels[source]])
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
        np.save(staging / "train_features.npy", apply_feature_stage(stage, train_pixels))
        np.save(staging / "train_labels.npy", train_labels)
        np.save(staging / "wild_features.npy",
                apply_feature_stage(stage, snapshot.pixels[wild]))
        np.save(staging / "wild_labels.npy", snapshot.labels[wild])
        render_label_grid(snapshot.pixels.reshape(-1, 28, 28), snapshot.labels,
                          staging / "sample-grid-feedback.png", title="feedback")
        ids = np.asarray(snapshot.ids, dtype=object)
        (staging / "ids.json").write_text(json.dumps(
            {"train": ids[~wild].tolist(), "wild": ids[wild].tolist()}))
        place_in_cache(staging, folder, marker="ids.json")
    logger.info("feedback %s: %d records for training (%d rows with augmented copies), %d in "
                "the wild test set, %d rejected left out", snapshot.store,
                reference.train_records, reference.train_rows, reference.wild_rows,
                reference.rejected)
    create_table_artifact(
        key="mnist-feedback-label-counts",
        table=[{"part": part, **{str(d): int((labels == d).sum()) for d in range(N_CLASSES)},
                "total": len(labels)}
               for part, labels in (("training", snapshot.labels[~wild]),
                                    ("wild test", snapshot.labels[wild]))],
        description=f"Feedback records per digit in {snapshot.store} "
                    f"(snapshot {snapshot.digest[:12]}; {snapshot.rejected} rejected)")
    return reference


@dataclass(frozen=True)
class FitResult:
    name: str  # "fold-0", …, or "final"
    model_dir: str
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
                "peak_rss_mb": self.peak_rss_mb}

    @classmethod
    def from_json(cls, data: dict, model_dir: Path) -> FitResult:
        def evaluation(doc: dict | None) -> Evaluation | None:
            if doc is None:
                return None
            return Evaluation(**{**doc, "labels": [LabelStatistics(**s)
                                                   for s in doc["labels"]]})

        return cls(data["name"], str(model_dir), evaluation(data["evaluation"]),
                   evaluation(data["train_evaluation"]), data["train_rows"],
                   data["test_rows"], data["seconds"], data["worker"],
                   evaluation(data["wild_evaluation"]), data["feedback_rows"],
                   threads=data.get("threads", 0),
                   peak_rss_mb=data.get("peak_rss_mb", 0.0))


def _fit_and_evaluate(name: str, algorithm: str, config: GbdtConfig | BaggedBoostingConfig,
                      train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                      *, feature_stage: FeatureStage, seed: int, threads: int, eval_train: bool,
                      model_dir: Path, feedback: FeedbackMatrix | None = None) -> FitResult:
    """Train on `train` plus the feedback's training rows (weighted), score on `test` and on
    the feedback's wild test set."""
    logger = get_run_logger()
    weights, feedback_rows, wild_evaluation = None, 0, None
    if feedback is not None and feedback.train_rows:
        extra_features, extra_labels = feedback.load_train()
        feedback_rows = len(extra_labels)
        weights = np.concatenate([np.ones(len(train[1]), np.float32),
                                  np.full(feedback_rows, feedback.weight, np.float32)])
        train = (np.concatenate([train[0], extra_features]),
                 np.concatenate([train[1], extra_labels]))
    logger.info("%s: training %s on %d rows (%d from feedback) with %d thread(s)", name,
                algorithm, len(train[1]), feedback_rows, threads)
    start = time.perf_counter()
    model = train_model(algorithm, config, train[0], train[1], feature_stage=feature_stage,
                        seed=seed, num_threads=threads, weights=weights)
    seconds = time.perf_counter() - start
    evaluation = evaluate(test[1], model.predict_proba(test[0]))
    train_evaluation = (evaluate(train[1], model.predict_proba(train[0])) if eval_train
                        else None)
    if feedback is not None and feedback.wild_rows:
        wild_features, wild_labels = feedback.load_wild()
        wild_evaluation = evaluate(wild_labels, model.predict_proba(wild_features))
    model.save(model_dir)
    logger.info("%s: accuracy %.4f on %d rows%s (fit %.1f s)", name, evaluation.accuracy,
                evaluation.rows, f", {wild_evaluation.accuracy:.4f} on {wild_evaluation.rows} "
                f"wild rows" if wild_evaluation else "", seconds)
    return FitResult(name, str(model_dir), evaluation, train_evaluation, len(train[1]),
                     len(test[1]), seconds, f"{socket.gethostname()}:{os.getpid()}",
                     wild_evaluation, feedback_rows, threads=threads,
                     peak_rss_mb=round(peak_rss_megabytes(), 1))


#: Bump when a change to training or evaluation makes earlier cached fits wrong to reuse.
FIT_CODE_VERSION = "1"


def _fit_key(name: str, spec: ExperimentSpec, config: GbdtConfig | BaggedBoostingConfig,
             matrices: list[str]) -> str:
    """What a fit's result depends on, hashed: its name, the spec (less the experiment's
    name, where the data and feedback came from, and whether a final fit follows, none of
    which changes this fit), the algorithm's configuration, the content-keyed folders of its
    inputs, and the code and LightGBM versions."""
    import lightgbm

    material = json.dumps({
        "fit": name, "code": FIT_CODE_VERSION, "lightgbm": lightgbm.__version__,
        "spec": spec.model_dump(mode="json", exclude={
            "experiment": True, "sources": True, "final_fit": True, "feedback": {"store"}}),
        "config": config.model_dump(mode="json"),
        "inputs": [Path(folder).name for folder in matrices]}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def fold_fit_key(spec: ExperimentSpec, config: GbdtConfig | BaggedBoostingConfig,
                 fold_index: int, matrix: FeatureMatrix, augmented: AugmentedMatrix | None,
                 feedback: FeedbackMatrix | None) -> str:
    """The key fold `fold_index`'s finished fit is stored under."""
    inputs = [matrix.folder, *(m.folder for m in (augmented, feedback) if m is not None)]
    return _fit_key(f"fold-{fold_index}", spec, config, inputs)


def final_fit_key(spec: ExperimentSpec, config: GbdtConfig | BaggedBoostingConfig,
                  train_matrix: FeatureMatrix, test_matrix: FeatureMatrix,
                  augmented: AugmentedMatrix | None, feedback: FeedbackMatrix | None) -> str:
    """The key the final model's finished fit is stored under."""
    inputs = [train_matrix.folder, test_matrix.folder,
              *(m.folder for m in (augmented, feedback) if m is not None)]
    return _fit_key("final", spec, config, inputs)


def is_fit_stored(key: str, fits_dir: Path) -> bool:
    """Whether a finished fit is stored under `key`: a rerun will reuse it, not train."""
    return (fits_dir / key / "fit.json").is_file()


def _reuse_or_fit(key: str, fits_dir: Path, fit) -> FitResult:
    """The finished fit stored under `key`, or `fit(staging)` run now and stored there. A
    rerun of a killed or failed experiment, or a retry, thus redoes only the fits that had
    not finished. The folder appears whole (a staging folder renamed into place), so a fit
    killed halfway leaves nothing to reuse."""
    folder = fits_dir / key
    if is_fit_stored(key, fits_dir):
        result = FitResult.from_json(json.loads((folder / "fit.json").read_text()),
                                     folder / "model")
        get_run_logger().info("%s: reusing the finished fit %s (accuracy %.4f)", result.name,
                              key, result.evaluation.accuracy)
        return dataclasses.replace(result, reused=True)
    fits_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=fits_dir))
    try:
        result = fit(staging)
        (staging / "fit.json").write_text(json.dumps(result.to_json()))
        place_in_cache(staging, folder, marker="fit.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dataclasses.replace(result, model_dir=str(folder / "model"))


@task(name="train-fold")
def train_fold(matrix: FeatureMatrix, spec: ExperimentSpec,
               config: GbdtConfig | BaggedBoostingConfig, fold_index: int, threads: int,
               fits_dir: Path, augmented: AugmentedMatrix | None = None,
               feedback: FeedbackMatrix | None = None) -> FitResult:
    """One model on one fold's training rows (plus the augmented copies of those rows, and
    the feedback's training rows), evaluated on its testing rows and the wild set; reused
    from `fits_dir` when this very fit has finished before."""
    name = f"fold-{fold_index}"

    def fit(staging: Path) -> FitResult:
        features, labels, row_hash = matrix.load()
        plan = plan_folds(spec.folds, row_hash)[fold_index]
        train = _with_augmented((np.asarray(features[plan.train_rows]),
                                 labels[plan.train_rows]), plan.train_rows, augmented)
        test = (np.asarray(features[plan.test_rows]), labels[plan.test_rows])
        return _fit_and_evaluate(name, spec.algorithm, config, train, test,
                                 feature_stage=spec.features, seed=spec.seed + fold_index,
                                 threads=threads, eval_train=spec.eval_train,
                                 model_dir=staging / "model", feedback=feedback)

    return _reuse_or_fit(fold_fit_key(spec, config, fold_index, matrix, augmented, feedback),
                         fits_dir, fit)


@task(name="train-final-model")
def train_final(train_matrix: FeatureMatrix, test_matrix: FeatureMatrix, spec: ExperimentSpec,
                config: GbdtConfig | BaggedBoostingConfig, threads: int,
                fits_dir: Path, augmented: AugmentedMatrix | None = None,
                feedback: FeedbackMatrix | None = None) -> FitResult:
    """One model on every training row (and every augmented copy, and the feedback's
    training rows), scored on the official test set and the wild set; reused from
    `fits_dir` when this very fit has finished before."""
    def fit(staging: Path) -> FitResult:
        features, labels, _ = train_matrix.load()
        test_features, test_labels, _ = test_matrix.load()
        return _fit_and_evaluate(
            "final", spec.algorithm, config,
            _with_augmented((np.asarray(features), labels), None, augmented),
            (np.asarray(test_features), test_labels), feature_stage=spec.features,
            seed=spec.seed, threads=threads, eval_train=spec.eval_train,
            model_dir=staging / "model", feedback=feedback)

    return _reuse_or_fit(final_fit_key(spec, config, train_matrix, test_matrix, augmented,
                                       feedback), fits_dir, fit)


# --- MLflow ----------------------------------------------------------------------------------


def _metrics(prefix: str, evaluation: Evaluation) -> dict[str, float]:
    return {f"{prefix}{name}": value for name, value in evaluation.scalar_metrics().items()}


def _log_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    for start in range(0, len(batch), 500):  # the REST API's batch limit is 1,000
        client.log_batch(run_id, metrics=batch[start:start + 500])


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    batch = [Param(key, value[:6000]) for key, value in params.items()]
    for start in range(0, len(batch), 90):  # the params batch limit is 100
        client.log_batch(run_id, params=batch[start:start + 90])


def _wild_metrics(prefix: str, result: FitResult) -> dict[str, float]:
    """`wild_accuracy` and the rest on the wild test set, and `wild_rows` (0 without one)."""
    if result.wild_evaluation is None:
        return {f"{prefix}wild_rows": 0.0} if result.feedback_rows else {}
    return {**_metrics(f"{prefix}wild_", result.wild_evaluation),
            f"{prefix}wild_rows": float(result.wild_evaluation.rows),
            f"{prefix}feedback_train_rows": float(result.feedback_rows)}


@task(name="prepare-experiment", **SERVICE_CALL_RETRIES)
def prepare_experiment(experiment: str, tracking_uri: str) -> str:
    """The MLflow experiment's id, created if needed. The flow runs this while the data is
    fetched: the first use of a new SQLite store builds its schema, seconds of work that
    need not wait for the data."""
    return ensure_experiment(tracking_client(tracking_uri), experiment, tracking_uri)


@task(name="start-experiment-run", **SERVICE_CALL_RETRIES)
def start_experiment_run(spec: ExperimentSpec, experiment_id: str,
                         algorithm_params: dict[str, str], dataset_fingerprint: str,
                         tracking_uri: str, flow_run_id: str | None) -> str:
    """The parent run: the whole spec and the algorithm's parameters as params. A run that
    an earlier attempt of this same flow run left RUNNING (its process was killed outright,
    so no hook ended it) is ended as KILLED first."""
    client = tracking_client(tracking_uri)
    if flow_run_id and (stale := end_open_runs(client, flow_run_id, "KILLED")):
        get_run_logger().warning("ended MLflow runs %s, left open by a dead earlier attempt "
                                 "of this flow run, as KILLED", ", ".join(stale))
    tags = {"mlpaint.dataset_fingerprint": dataset_fingerprint,
            "mlflow.runName": f"{spec.algorithm}-{spec.features.value}"}
    if flow_run_id:
        tags[FLOW_RUN_TAG] = flow_run_id
    run = client.create_run(experiment_id, tags=tags)
    _log_params(client, run.info.run_id, {**spec.flat_params(), **algorithm_params})
    return run.info.run_id


@task(name="log-datasets", **SERVICE_CALL_RETRIES)
def log_data_inputs(parent_run_id: str, tables: dict[str, str], limit: int | None,
                    feedback: FeedbackMatrix | None, tracking_uri: str) -> None:
    """The parent run's inputs: MNIST's training and test splits and, when used, the
    feedback snapshot's training part and wild test set, each with its digest and rows."""
    uses = []
    for split, context in (("train", "training"), ("test", "testing")):
        meta = load_table(Path(tables[split])).meta
        digest = hashlib.sha256(json.dumps(sorted(meta.inputs_sha256.values())).encode())
        uses.append(DatasetUse(f"mnist-{split}", digest.hexdigest(), meta.origin,
                               min(limit, meta.rows) if limit else meta.rows, context))
    if feedback is not None:
        uses += [DatasetUse("feedback", feedback.digest, feedback.store,
                            feedback.train_records, "training"),
                 DatasetUse("feedback-wild", feedback.digest, feedback.store,
                            feedback.wild_rows, "wild test")]
    log_datasets(tracking_client(tracking_uri), parent_run_id, uses)


def _write_fit_artifacts(result: FitResult, folder: Path, title: str) -> list[Path]:
    paths = write_evaluation_artifacts(result.evaluation, folder, title)
    statistics = folder / "statistics.json"
    statistics.write_text(json.dumps({
        "test": result.evaluation.to_json(),
        "train": result.train_evaluation.to_json() if result.train_evaluation else None,
        "train_rows": result.train_rows, "fit_seconds": result.seconds}, indent=1))
    return [*paths, statistics]


#: On a fold run: "true" when its fit was taken from an earlier attempt's finished work.
FIT_REUSED_TAG = "mlpaint.fit_reused"


@task(name="log-fold-run", **SERVICE_CALL_RETRIES)
def log_fold_run(result: FitResult, parent_run_id: str, tracking_uri: str) -> str:
    """A nested run for one fold: its metrics, evaluation artifacts and model files.

    Idempotent: a retry after a failed call (the tracking server went away halfway) finishes
    the fold run the first try created instead of creating a second one. The run carries
    the parent's Prefect flow run tag, so a dead attempt's open fold runs are ended too."""
    client = tracking_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    earlier = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                      f"tags.`mlflow.runName` = '{result.name}'")
    if earlier and earlier[0].info.status == "FINISHED":
        return earlier[0].info.run_id
    if earlier:
        run_id = earlier[0].info.run_id
    else:
        tags = {"mlflow.parentRunId": parent_run_id, "mlflow.runName": result.name,
                FIT_REUSED_TAG: str(result.reused).lower()}
        if FLOW_RUN_TAG in parent.data.tags:
            tags[FLOW_RUN_TAG] = parent.data.tags[FLOW_RUN_TAG]
        run_id = client.create_run(parent.info.experiment_id, tags=tags).info.run_id
    _log_params(client, run_id, {"fold": result.name, "train_rows": str(result.train_rows),
                                 "test_rows": str(result.test_rows)})
    metrics = {**_metrics("", result.evaluation), **_wild_metrics("", result)}
    if result.train_evaluation:
        metrics.update(_metrics("train_", result.train_evaluation))
    metrics["fit_seconds"] = result.seconds
    metrics["fit_threads"] = result.threads
    metrics["fit_peak_rss_mb"] = result.peak_rss_mb
    _log_metrics(client, run_id, metrics)
    with tempfile.TemporaryDirectory() as scratch:
        for path in _write_fit_artifacts(result, Path(scratch), result.name):
            client.log_artifact(run_id, str(path), "evaluation")
    client.log_artifacts(run_id, result.model_dir, "model")
    client.set_terminated(run_id)
    return run_id


@task(name="log-final-model", **SERVICE_CALL_RETRIES)
def log_final_model(final: FitResult, test_table_dir: str, parent_run_id: str,
                    tracking_uri: str) -> RegisteredModel:
    """The final model in the parent run as a pixel-in pyfunc (its feature stage inside),
    with two official test digits as its input example, registered as `mnist-digits`."""
    example = load_table(Path(test_table_dir)).pixels[:2]
    # Registered while folds may still train; marked complete only when they all have.
    return log_digit_model(tracking_client(tracking_uri), parent_run_id, Path(final.model_dir),
                           example, complete=False)


@dataclass(frozen=True)
class ExperimentSummary:
    parent_run_id: str
    folds: list[FitResult]
    aggregated: dict[str, Aggregate]
    final: FitResult | None
    registered: RegisteredModel | None
    publication: dict | None = None  # the publish flow's report, when it ran
    feedback: FeedbackMatrix | None = None  # the feedback snapshot it trained with

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
        }


@task(name="log-experiment-summary", **SERVICE_CALL_RETRIES)
def log_experiment_summary(summary: ExperimentSummary, spec: ExperimentSpec,
                           sample_grid: str | None, tracking_uri: str) -> None:
    """Aggregates and test metrics on the parent run, its artifacts, and the end of the run."""
    client = tracking_client(tracking_uri)
    run_id = summary.parent_run_id
    metrics = {}
    for name, stats in summary.aggregated.items():
        metrics.update({f"folds_{name}_{k}": v for k, v in asdict(stats).items()})
    if summary.final:
        metrics.update(_metrics("test_", summary.final.evaluation))
        metrics.update(_wild_metrics("", summary.final))
    # The flow's own process is measured by recording_resources; fits may run elsewhere.
    metrics["resources/fit_peak_rss_mb"] = max(
        fit.peak_rss_mb for fit in [*summary.folds, *filter(None, [summary.final])])
    _log_metrics(client, run_id, metrics)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if summary.final:
            for path in _write_fit_artifacts(summary.final, folder / "test", "official test"):
                client.log_artifact(run_id, str(path), "evaluation/test")
        (folder / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
        (folder / "summary.json").write_text(json.dumps(summary.to_json(), indent=1))
        client.log_artifact(run_id, str(folder / "spec.json"))
        client.log_artifact(run_id, str(folder / "summary.json"))
    if sample_grid:
        client.log_artifact(run_id, sample_grid, "data")
    if summary.feedback:
        client.log_artifact(run_id, summary.feedback.sample_grid, "data")
    if summary.registered:
        mark_complete(client, summary.registered)
    client.set_terminated(run_id)


def fit_threads(parallel_fits: int) -> int:
    """LightGBM threads per fit, so concurrent fits share the cores rather than fight."""
    return max(1, (os.cpu_count() or 1) // max(1, parallel_fits))

