"""The monitor flow's steps: read what people answered and drew, measure it against the
served model and the training digits, record the result in MLflow, raise the alarm."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from prefect import task
from prefect.logging import get_run_logger

from mlpaint.data.dataset import load_table
from mlpaint.feedback.monitoring import (
    ACCURACY_DROPPED,
    MONITOR_EXPERIMENT,
    MonitorReport,
    MonitorSpec,
    drift_of,
    monitor_report,
    write_plots,
)
from mlpaint.feedback.store import FeedbackStore
from mlpaint.feedback.traffic import TrafficFigures, live_traffic, percent
from mlpaint.publishing.bundle import BundleIntegrityError, load_bundle
from mlpaint.storage.catalog import local_folder
from mlpaint.tracking import ensure_experiment, tracking_client
from tasks.retries import SERVICE_CALL_RETRIES


@task(name="measure-live-use", **SERVICE_CALL_RETRIES)
def measure_live_use(spec: MonitorSpec, store_uri: str, bundle_uri: str, train_table: str,
                     cache_dir: Path) -> MonitorReport:
    """The accepted feedback records' answers, and their drawings' drift from a sample of
    the training digits as the bundle LATEST names reads both (no drift without a bundle)."""
    logger = get_run_logger()
    store = FeedbackStore.at(store_uri)
    records = store.accepted()
    drift, bundle_version = [], None
    try:
        bundle = load_bundle(bundle_uri, cache_dir=cache_dir)
    except BundleIntegrityError as exc:
        logger.warning("no drift measured: %s", exc)
    else:
        bundle_version = bundle.info.version
        if records:
            model = bundle.model()
            training = load_table(local_folder(train_table)).pixels
            sample = np.random.default_rng(spec.seed).choice(
                len(training), min(spec.reference_rows, len(training)), replace=False)
            reference = training[np.sort(sample)]
            live = np.stack([record.pixels for record in records])
            drift = drift_of(reference, model.predict_pixels(reference), live,
                             model.predict_pixels(live))
    report = monitor_report(store.describe(), records, spec, drift, bundle_version)
    logger.info("%d records, %d answers judged; the last %d: %s right (floor %.0f%%)%s",
                report.records, report.answers, report.recent.answers,
                "n/a" if report.recent.accuracy is None else f"{report.recent.accuracy:.1%}",
                100 * spec.accuracy_floor, ": BELOW THE FLOOR" if report.recent.dropped else "")
    return report


@task(name="read-live-traffic", **SERVICE_CALL_RETRIES)
def read_live_traffic(prometheus_url: str, window: str) -> TrafficFigures:
    """What Prometheus counted of the servers' answers and requests over `window`."""
    traffic = live_traffic(prometheus_url, window)
    get_run_logger().info(
        "Prometheus at %s, last %s: about %.0f answers, %s of them \"not sure\", %s judged; "
        "serving %s", prometheus_url, window, traffic.answers,
        percent(traffic.answer_share("low_confidence")), percent(traffic.judged_share),
        ", ".join(bundle for bundle, _ in traffic.serving) or "nothing scraped")
    return traffic


@task(name="record-monitor-run", **SERVICE_CALL_RETRIES)
def record_monitor_run(report: MonitorReport, tracking_uri: str) -> str:
    """One MLflow run in the `mlpaint-monitor` experiment: the figures as metrics, the report
    as JSON and markdown, the plots."""
    from mlflow.entities import Metric

    client = tracking_client(tracking_uri)
    experiment_id = ensure_experiment(client, MONITOR_EXPERIMENT, tracking_uri)
    run = client.create_run(experiment_id, tags={
        "mlflow.runName": f"monitor {report.bundle_version or 'no bundle'}",
        "mlpaint.feedback_store": report.store,
        "mlpaint.bundle_version": report.bundle_version or ""})
    run_id = run.info.run_id
    step_time = run.info.start_time
    client.log_batch(run_id, metrics=[Metric(key, value, step_time, 0)
                                      for key, value in report.metrics().items()])
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "report.json").write_text(json.dumps(report.to_json(), indent=1))
        (folder / "report.md").write_text(report.markdown())
        for path in [folder / "report.json", folder / "report.md",
                     *write_plots(report, folder / "plots")]:
            client.log_artifact(run_id, str(path),
                                "plots" if path.suffix == ".png" else None)
    client.set_terminated(run_id)
    return run_id


@task(name="announce-accuracy-drop")
def announce_accuracy_drop(report: MonitorReport) -> str | None:
    """The `mlpaint.monitor.accuracy-dropped` Prefect event, for automations and deployment
    triggers; its id, or None when Prefect did not take it."""
    from prefect.events import emit_event

    recent = report.recent
    event = emit_event(
        event=ACCURACY_DROPPED,
        resource={"prefect.resource.id": f"mlpaint.monitor.{report.store}",
                  "prefect.resource.name": f"feedback at {report.store}"},
        payload={"accuracy": recent.accuracy, "answers": recent.answers,
                 "floor": recent.floor, "bundle_version": report.bundle_version})
    get_run_logger().warning("live accuracy %.1f%% over the last %d answers is below %.0f%%: "
                             "%s emitted", 100 * recent.accuracy, recent.answers,
                             100 * recent.floor, ACCURACY_DROPPED)
    return str(event.id) if event else None
