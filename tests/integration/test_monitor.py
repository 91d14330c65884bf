"""The monitor flow through `mlpaint monitor`, on a real Prefect server and a SQLite MLflow
store: a feedback store with a known share of wrong answers per bundle and day is reported
exactly, the alarm's event reaches Prefect, and the run is recorded in MLflow."""

import collections
import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import requests
from mlflow import MlflowClient

from mlpaint.feedback.monitoring import ACCURACY_DROPPED, MONITOR_EXPERIMENT
from mlpaint.feedback.store import FeedbackRecord, FeedbackStore
from mlpaint.publishing.bundle import load_bundle
from tests.conftest import official_test_digits, prefect_events, run_cli, wait_for

pytestmark = pytest.mark.integration

# (bundle, day, answers, wrong): the last 30 answers are bundle v2's, 70% right.
SERVED = [("v1", "2026-12-01", 30, 3), ("v1", "2026-12-02", 20, 2), ("v2", "2026-12-02", 30, 9)]


def _fill_store(root, mnist) -> list[FeedbackRecord]:
    """The answers of SERVED on official test digits (a wrong answer said label + 1), then
    five labels posted without an answer, and two more answers that a reviewer rejected."""
    total = sum(answers for _, _, answers, _ in SERVED)
    pixels, labels = official_test_digits(mnist, total + 7)
    store = FeedbackStore.at(str(root))
    records, row = [], 0
    for hour, (version, day, answers, wrong) in enumerate(SERVED, start=8):
        for i in range(answers):
            label = int(labels[row])
            answered = (label + 1) % 10 if i < wrong else label
            records.append(replace(
                FeedbackRecord.new(label=label, pixels=pixels[row], answered_digit=answered,
                                   bundle_version=version),
                received_at=f"{day}T{hour:02d}:{i:02d}:00.000Z"))
            row += 1
    later = "2026-12-03T09:00:00.000Z"
    records += [replace(FeedbackRecord.new(label=int(labels[r]), pixels=pixels[r]),
                        received_at=later) for r in range(row, row + 5)]
    rejected = [replace(FeedbackRecord.new(label=int(labels[r]), pixels=pixels[r],
                                           answered_digit=int(labels[r]), bundle_version="v2"),
                        received_at=later) for r in range(row + 5, row + 7)]
    for record in records + rejected:
        store.add(record)
    for record in rejected:
        store.reject(record.id, "not a digit")
    return records


def test_the_monitor_reports_live_accuracy_drift_and_raises_the_alarm(
        bundle_root, shared_mnist, cli_env, prefect_api, tmp_path):
    records = _fill_store(tmp_path / "feedback", shared_mnist)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = datetime.now(UTC)
    result = run_cli(["monitor", "--feedback-store", str(tmp_path / "feedback"),
                      "--bundle", str(bundle_root / "bundles"), "--source", str(shared_mnist),
                      "--last", "30", "--floor", "0.8", "--reference-rows", "2000", "--json"],
                     {**cli_env, "MLFLOW_TRACKING_URI": tracking_uri})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    assert (report["records"], report["answers"]) == (85, 80)
    assert report["accuracy"] == pytest.approx(66 / 80)
    assert [(r["bundle_version"], r["day"], r["answers"], r["answers"] - r["right"])
            for r in report["by_version_and_day"]] == SERVED
    assert [(r["bundle_version"], r["accuracy"]) for r in report["by_version"]] == [
        ("v1", pytest.approx(45 / 50)), ("v2", pytest.approx(21 / 30))]
    wrong = collections.Counter((r.answered_digit, r.label) for r in records if r.corrected)
    assert {(c["answered"], c["label"]): c["count"] for c in report["corrections"]} == dict(
        sorted(wrong.items(), key=lambda item: (-item[1], item[0]))[:5])
    assert report["recent"] == {"window": 30, "answers": 30, "right": 21, "floor": 0.8,
                                "accuracy": pytest.approx(0.7), "dropped": True}
    # The drawings are MNIST's own digits: the served model sees no drift in their ink.
    assert report["bundle_version"] == load_bundle(str(bundle_root / "bundles")).info.version
    drift = {d["measure"]: d for d in report["drift"]}
    assert set(drift) == {"ink", "height_px", "width_px", "slant_deg", "predicted_digit",
                          "confidence"}
    assert not any(drift[m]["drifted"] for m in ("ink", "height_px", "width_px", "slant_deg"))
    assert sum(drift["ink"]["live_counts"]) == 85
    assert sum(drift["ink"]["reference_counts"]) == 2000

    events = wait_for(lambda: prefect_events(prefect_api, ACCURACY_DROPPED, started),
                      f"the {ACCURACY_DROPPED} event")
    assert len(events) == 1
    assert events[0]["payload"]["accuracy"] == pytest.approx(0.7)
    assert events[0]["payload"]["answers"] == 30
    artifacts = requests.post(f"{prefect_api}/artifacts/filter", json={
        "artifacts": {"key": {"any_": ["mlpaint-live-accuracy-by-day"]}}}, timeout=10).json()
    assert any(len(json.loads(a["data"])) == 3 for a in artifacts)

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(MONITOR_EXPERIMENT)
    [run] = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["live_accuracy"] == pytest.approx(66 / 80)
    assert run.data.metrics["recent_accuracy"] == pytest.approx(0.7)
    assert run.data.metrics["accuracy_dropped"] == 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"report.json", "report.md", "plots/live_accuracy.png",
            "plots/drift.png"} <= artifacts
