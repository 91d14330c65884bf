"""The publish flow: bundle a registered model with exact explanations, gate it against the
champion, and publish it atomically."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.attempts import check_attempts
from flows.ingest import ingest_mnist
from mlpaint.data.fetch import IngestSpec
from mlpaint.data.integrity import default_cache_dir
from mlpaint.publishing.build import PublishReport
from mlpaint.publishing.bundle import PUBLISH_LOCK, local_user
from mlpaint.publishing.spec import PublishSpec
from mlpaint.storage.catalog import BUILT_BUNDLES, default_bundle_destination, work_area
from mlpaint.storage.stores import store_for
from mlpaint.tracking import resolve_tracking_uri
from tasks.data import fetch_pen_table
from tasks.publish import (
    build_bundle,
    gate,
    record_publication,
    resolve_candidate,
    upload_bundle,
)


def _who_publishes() -> str:
    """This flow run, and its deployment or the user who ran it, for the history of LATEST."""
    from prefect.runtime import deployment, flow_run

    run = f"flow run {flow_run.name} ({flow_run.id})"
    if deployment.name:
        return f"{run} of deployment {deployment.name}"
    return f"{run} by {local_user()}"


@flow(name="publish-mnist-model")
def publish_model(spec: PublishSpec | None = None, cache_dir: str | None = None
                  ) -> PublishReport:
    """Publish a registered `mnist-digits` version with precomputed SHAP explanations,
    through the champion/challenger gate.

    Args:
        spec: which version, where to, and how the gate decides (every field has a default:
            the newest complete version, to the default bundle destination).
        cache_dir: this machine's data cache (default $MLPAINT_CACHE_DIR or ~/.cache/mlpaint).
    """
    check_attempts()
    spec = spec or PublishSpec()
    destination = spec.to or default_bundle_destination()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    tracking_uri = resolve_tracking_uri()
    candidate = resolve_candidate(spec.run_id, spec.model_version, tracking_uri)
    dataset = ingest_mnist(IngestSpec(sources=spec.sources), str(cache))
    pen_table = fetch_pen_table(spec.pen_sources, cache)
    fingerprint = {"dataset": dataset.fingerprint,
                   "training_run_dataset": candidate.data_fingerprint}
    with work_area(cache, f"publish-v{candidate.version}") as work_dir:
        built = build_bundle(candidate, dataset.tables["test"], fingerprint,
                             spec.gallery_per_digit, cache / BUILT_BUNDLES, work_dir,
                             tracking_uri)
        # Read the champion, compare, move LATEST and the alias as one critical section per
        # destination: two publishers at once (a scheduled run and a UI run) otherwise can
        # leave the alias and LATEST naming different versions.
        with store_for(destination).lock(PUBLISH_LOCK):
            decision = gate(candidate, built, dataset.tables["test"], spec.margin, spec.force,
                            tracking_uri, destination, str(cache), spec.feedback_store,
                            str(pen_table))
            result = upload_bundle(built, destination, decision, spec.retention,
                                   _who_publishes())
            record_publication(candidate, built, decision, destination, tracking_uri)
    create_markdown_artifact(
        key="mnist-model-publication",
        markdown="\n".join([
            f"# mnist-digits version {candidate.version}: **{decision.alias}**", "",
            f"- bundle `{built.info.version}` at `{result.uri}`",
            f"- LATEST names `{result.latest}`",
            f"- official test accuracy {built.test_accuracy:.4f}",
            f"- gate: {decision.reason}",
            f"- gallery: {built.info.gallery['rows']} digits, "
            f"{built.info.gallery['bytes'] / 1e6:.1f} MB, additivity error "
            f"{built.info.gallery['max_additivity_error']:.1e}"]),
        description="Where the model was published, and why it was or was not promoted")
    return PublishReport(candidate.version, candidate.run_id, result, decision,
                         int(built.info.gallery["bytes"]))
