"""Prefect tasks for publishing: the registry and destinations are I/O and retry; building
the bundle is compute and does not."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from mlpaint.data.dataset import load_table, row_keys
from mlpaint.data.pins import Split
from mlpaint.publishing.build import (
    BuiltBundle,
    build_bundle_folder,
    built_bundle_key,
    explain_test_set,
    keep_built,
    read_built,
)
from mlpaint.publishing.bundle import (
    LatestChange,
    PublishResult,
    publish_bundle,
)
from mlpaint.publishing.champion import GateInputs, gate_candidate
from mlpaint.publishing.gate import (
    GateDecision,
)
from mlpaint.storage.stores import store_for
from mlpaint.tracking import (
    tracking_client,
)
from mlpaint.tracking.publication import (
    CandidateRef,
    find_candidate,
    load_registered_model,
    record_decision,
)
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
    """Weigh the candidate against the champion (`gate_candidate`: the registry's, else the
    bundle served at `destination`) and log the decision."""
    decision = gate_candidate(
        candidate, built,
        GateInputs(Path(test_table_dir), Path(cache_dir), feedback_store,
                   Path(pen_table) if pen_table else None),
        margin=margin, force=force, tracking_uri=tracking_uri, destination=destination)
    get_run_logger().info("gate: %s — %s", decision.alias, decision.reason)
    return decision


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
