"""The monitor flow: live accuracy per served bundle and day from people's answers, the
drift of their drawings from the training digits, every answer's traffic as Prometheus
counted it (when one is named), and an event when accuracy drops."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.ingest import ingest_mnist
from mlpaint.data.fetch import IngestSpec
from mlpaint.data.integrity import default_cache_dir
from mlpaint.feedback.monitoring import MonitorReport, MonitorSpec
from mlpaint.storage.catalog import default_bundle_destination, default_feedback_store
from mlpaint.tracking import resolve_tracking_uri
from tasks.monitor import (
    announce_accuracy_drop,
    measure_live_use,
    read_live_traffic,
    record_monitor_run,
)


@flow(name="monitor-mlpaint")
def monitor(spec: MonitorSpec | None = None, cache_dir: str | None = None) -> MonitorReport:
    """Report how the served model does on what people draw.

    Args:
        spec: the feedback store, the served destination and the alarm's window and floor
            (every field has a default: the stores `make run` and `make serve` use).
        cache_dir: this machine's data cache (default $MLPAINT_CACHE_DIR or ~/.cache/mlpaint).
    """
    spec = spec or MonitorSpec()
    bundle = spec.bundle or default_bundle_destination()
    store = spec.feedback_store or default_feedback_store(bundle)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    dataset = ingest_mnist(IngestSpec(sources=spec.sources), str(cache))
    report = measure_live_use(spec, store, bundle, dataset.tables["train"], cache)
    if prometheus := spec.prometheus():
        report = report.with_traffic(read_live_traffic(prometheus, spec.prometheus_window))
    run_id = record_monitor_run(report, resolve_tracking_uri())
    if report.recent.dropped:
        announce_accuracy_drop(report)
    create_markdown_artifact(key="mlpaint-live-accuracy",
                             markdown=f"{report.markdown()}\n\nMLflow run `{run_id}`.",
                             description="Live accuracy and drift of the served model")
    if report.by_version_and_day:
        create_table_artifact(key="mlpaint-live-accuracy-by-day",
                              table=[row.to_json() for row in report.by_version_and_day],
                              description="Right answers per served bundle and day")
    return report
