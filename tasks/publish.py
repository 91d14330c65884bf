"""Prefect tasks for publishing: the registry and destinations are I/O and retry; building
the bundle is compute and does not."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from prefect import task
from prefect.logging import get_run_logger

from mlpaint.data.dataset import load_table, row_keys
from mlpaint.data.integrity import atomic_path
from mlpaint.data.pendigits import PenTable, load_pen_table
from mlpaint.data.pins import Split
from mlpaint.feedback.store import FeedbackSnapshot, FeedbackStore, wild_rows
from mlpaint.images.drawing import DRAWING_CODE_VERSION, DrawnTestSet, drawn_set_of_writers
from mlpaint.publishing.build import (
    BuiltBundle,
    build_bundle_folder,
    built_bundle_key,
    explain_test_set,
    keep_built,
    read_built,
)
from mlpaint.publishing.bundle import (
    BundleIntegrityError,
    LatestChange,
    PublishResult,
    current_pointer,
    load_bundle,
    publish_bundle,
)
from mlpaint.publishing.gate import (
    DrawnScores,
    GateDecision,
    WildScores,
    accuracy,
    decide,
    gate_wild_share,
    held_out_writers,
    right_answers,
)
from mlpaint.storage.stores import store_for
from mlpaint.tracking import (
    REGISTERED_MODEL_NAME,
    tracking_client,
)
from mlpaint.tracking.publication import (
    CHAMPION,
    CandidateRef,
    find_candidate,
    load_registered_model,
    record_decision,
    version_with_alias,
)
from mlpaint.training.algorithms import DigitModel, ModelFormatError
from mlpaint.training.evaluation import compare_paired
from tasks.retries import SERVICE_CALL_RETRIES


@task(name="resolve-model-version", **SERVICE_CALL_RETRIES)
def resolve_candidate(run_id: str | None, model_version: str | None,
                      tracking_uri: str) -> CandidateRef:
    """The model version to publish (`find_candidate`)."""
    return find_candidate(tracking_client(tracking_uri), run_id, model_version)


@task(name="build-bundle")
def build_bundle(candidate: CandidateRef, test_table_dir: str, data_fingerprint: dict,
                 per_digit: int, built_dir: Path, work_dir: Path,
                 tracking_uri: str) -> BuiltBundle:
    """Load the candidate, explain the whole official test set exactly, build the bundle.

    The bundle is kept under `built_dir`, keyed by all it depends on, so a retry or rerun of
    a publication that died after this step (at the gate, the upload, the registry) takes it
    from there instead of explaining 10,000 digits again."""
    logger = get_run_logger()
    folder = built_dir / built_bundle_key((candidate.name, candidate.version, candidate.run_id),
                                          Path(test_table_dir), data_fingerprint, per_digit)
    if (kept := read_built(folder)) is not None:
        logger.info("reusing the bundle built for version %s by an earlier attempt (%s)",
                    candidate.version, folder)
        return kept
    table = load_table(Path(test_table_dir))
    model = load_registered_model(candidate.name, candidate.version, tracking_uri)
    features = model.features(table.pixels)
    explanations = explain_test_set(model, features, table.pixels, table.labels,
                                    table.row_hash, row_keys(Split.TEST, table.meta.rows),
                                    per_digit=per_digit)
    logger.info("explained %d test digits; accuracy %.4f; gallery additivity error %.2e",
                table.meta.rows, explanations.test_accuracy,
                explanations.max_additivity_error)
    staging = Path(tempfile.mkdtemp(prefix=f"bundle-v{candidate.version}-", dir=work_dir))
    info = build_bundle_folder(
        staging / "bundle", model, explanations, model_name=candidate.name,
        model_version=candidate.version, run_id=candidate.run_id,
        metrics={"test_accuracy": explanations.test_accuracy,
                 "test_rows": float(table.meta.rows)},
        data_fingerprint={**data_fingerprint, **table.meta.inputs_sha256})
    return keep_built(staging, folder, info, explanations.test_accuracy)


@task(name="gate-against-champion", **SERVICE_CALL_RETRIES)
def gate(candidate: CandidateRef, built: BuiltBundle, test_table_dir: str,
         margin: float, force: bool, tracking_uri: str, destination: str, cache_dir: str,
         feedback_store: str | None = None, pen_table: str | None = None) -> GateDecision:
    """Score the current champion on the same official test set (and, given a feedback
    store, candidate and champion on its records neither trained on; given pen
    trajectories, both on the drawings of the writers neither trained on, each as the
    runs' recorded specs say) and decide. The champion is the
    registry's `champion` version; where the registry names none, the model of the bundle
    `destination`'s LATEST names, which people are being served (a remote one copied into
    `cache_dir`). The candidate's test accuracy and model come from its built bundle, not
    from the registry again."""
    candidate_accuracy = built.test_accuracy
    champion = version_with_alias(tracking_client(tracking_uri), REGISTERED_MODEL_NAME,
                                  CHAMPION)
    champion_version = str(champion.version) if champion else None
    champion_name = None
    if champion_version == candidate.version:
        return _decided(decide(candidate_accuracy, candidate_accuracy, champion_version,
                               margin=margin, force=force))
    if champion is not None:
        try:
            model = load_registered_model(REGISTERED_MODEL_NAME, champion_version,
                                          tracking_uri)
        except ModelFormatError:
            if not force:
                raise
            # An operator replacing a champion that an older mlpaint registered: it cannot
            # be scored, and the decision says so rather than "no champion yet".
            return _decided(GateDecision(
                True, CHAMPION, candidate_accuracy, None, champion_version, margin, True,
                f"forced by the operator; champion version {champion_version} was "
                "registered by an older mlpaint and cannot be scored"))
    else:
        model, champion_name = _served_model(destination, Path(cache_dir))
    champion_accuracy = wild = paired = drawn = None
    if model is not None:
        table = load_table(Path(test_table_dir))
        candidate_model = DigitModel.load(Path(built.staging) / "model")
        champion_right = right_answers(model, table.pixels, table.labels)
        champion_accuracy = float(champion_right.mean())
        paired = compare_paired(champion_right,
                                right_answers(candidate_model, table.pixels, table.labels))
        client = tracking_client(tracking_uri)
        candidate_params = client.get_run(candidate.run_id).data.params
        champion_params = (client.get_run(client.get_model_version(
            REGISTERED_MODEL_NAME, champion_version).run_id).data.params
            if champion is not None else None)
        if feedback_store:
            wild = _wild_scores(candidate_model, model, feedback_store,
                                gate_wild_share(candidate_params, champion_params))
        if pen_table:
            drawn = _drawn_scores(candidate_model, model, Path(pen_table), candidate_params,
                                  champion_params, Path(cache_dir))
    return _decided(decide(candidate_accuracy, champion_accuracy, champion_version,
                           margin=margin, force=force, wild=wild, champion_name=champion_name,
                           paired=paired, drawn=drawn))


def _served_model(destination: str, cache_dir: Path) -> tuple[DigitModel | None, str | None]:
    """The model of the bundle LATEST names at `destination`, and how a decision names it;
    (None, None) where nothing is served there yet. A registry without a champion (a new
    MLflow store publishing to an existing destination) must not let a worse model replace
    the one people are served."""
    served = current_pointer(destination)
    if served is None:
        return None, None
    try:
        bundle = load_bundle(destination, version=served, cache_dir=cache_dir)
        model = bundle.model()
    except (BundleIntegrityError, ModelFormatError, FileNotFoundError) as exc:
        # Nothing a server could load either: replacing it can only help.
        get_run_logger().warning("gate: the bundle %s that LATEST names at %s cannot be read "
                                 "(%s); gating as if nothing were served", served,
                                 destination, exc)
        return None, None
    return model, (f"the served bundle {served}, model version {bundle.info.model_version} "
                   "of the registry that published it")


def _decided(decision: GateDecision) -> GateDecision:
    get_run_logger().info("gate: %s — %s", decision.alias, decision.reason)
    return decision


def _wild_scores(candidate_model: DigitModel, champion_model: DigitModel,
                 feedback_store: str, share: float) -> WildScores:
    """Both models on the feedback store's records, as it is now, in the wild buckets of
    `share` (`gate_wild_share`: those neither model trained on)."""
    snapshot = FeedbackSnapshot.of(FeedbackStore.at(feedback_store))
    wild = wild_rows(snapshot.row_hash, share)
    if not wild.any():
        return WildScores(0, 0.0, None, share)
    pixels, labels = snapshot.pixels[wild], snapshot.labels[wild]
    return WildScores(int(wild.sum()), accuracy(candidate_model, pixels, labels),
                      accuracy(champion_model, pixels, labels), share)


def _drawn_set(table: PenTable, writers: frozenset[int], cache_dir: Path) -> DrawnTestSet:
    """`drawn_set_of_writers`, kept in the cache by the trajectories, the writers and the
    drawing code: every publication gates on it, and drawing thousands of digits takes
    seconds."""
    material = json.dumps({"pen": table.meta.sha256, "writers": sorted(writers),
                           "code": DRAWING_CODE_VERSION})
    path = cache_dir / "drawn-sets" / f"{hashlib.sha256(material.encode()).hexdigest()[:32]}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return DrawnTestSet(stored["pixels"], stored["labels"], stored["writers"])
    drawn = drawn_set_of_writers(table, writers)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial, partial.open("wb") as out:
        np.savez(out, pixels=drawn.pixels, labels=drawn.labels, writers=drawn.writers)
    return drawn


def _drawn_scores(candidate_model: DigitModel, champion_model: DigitModel, pen_table: Path,
                  candidate_params: dict[str, str], champion_params: dict[str, str] | None,
                  cache_dir: Path) -> DrawnScores | None:
    """Both models on the pen drawings of the writers neither trained on, as each run's
    recorded spec says (`held_out_writers`). A champion whose run is not in this registry
    (a served bundle from another) is taken to have trained on whatever the candidate did
    not hold out: the comparison can then favour the champion, never the candidate."""
    table = load_pen_table(pen_table)
    writers = sorted(set(table.writers.tolist()))
    held_out = held_out_writers(candidate_params, writers)
    if champion_params is not None:
        held_out &= held_out_writers(champion_params, writers)
    if not held_out:
        return None
    drawn = _drawn_set(table, held_out, cache_dir)
    return DrawnScores(len(drawn.labels), len(held_out),
                       accuracy(candidate_model, drawn.pixels, drawn.labels),
                       accuracy(champion_model, drawn.pixels, drawn.labels))


@task(name="upload-bundle", **SERVICE_CALL_RETRIES)
def upload_bundle(built: BuiltBundle, destination: str, decision: GateDecision,
                  retention: int, by: str) -> PublishResult:
    change = LatestChange("publish", decision.reason, by=by, forced=decision.forced,
                          model_version=built.info.model_version)
    result = publish_bundle(Path(built.staging), store_for(destination), built.info.version,
                            promote=decision.promote, retention=retention, change=change)
    get_run_logger().info("bundle %s uploaded to %s; LATEST = %s; pruned %s",
                          result.version, result.uri, result.latest, result.pruned or "none")
    return result


@task(name="record-publication", **SERVICE_CALL_RETRIES)
def record_publication(candidate: CandidateRef, built: BuiltBundle, decision: GateDecision,
                       destination: str, tracking_uri: str) -> None:
    """The gate's decision in the registry and the candidate's run (`record_decision`)."""
    record_decision(tracking_client(tracking_uri), candidate, decision.alias, decision.reason,
                    {**asdict(decision), "bundle": destination,
                     "bundle_version": built.info.version},
                    destination, built.info.version, Path(built.staging) / "explanations")
