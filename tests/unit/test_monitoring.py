"""Live accuracy and drift on tiny hand-made answers and arrays: every figure the monitor
reports is checked exactly."""

from dataclasses import replace

import numpy as np
import pytest
from scipy.ndimage import grey_dilation

from mlpaint.feedback.monitoring import (
    MonitorSpec,
    accuracy_by_version,
    answers_of,
    drift_of,
    monitor_report,
    recent_accuracy,
    top_corrections,
)
from mlpaint.feedback.store import FeedbackRecord
from mlpaint.feedback.traffic import traffic_figures, traffic_queries
from mlpaint.model.features import DRAWING_MEASURES, drawing_measures


def _record(label, answered, version, at, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, 784).astype(np.uint8)
    record = FeedbackRecord.new(label=label, pixels=pixels, answered_digit=answered,
                                bundle_version=version)
    return replace(record, received_at=at)


@pytest.fixture
def records():
    """Bundle a: 4 answers on the 1st (one wrong: a 9 said to be a 3), 2 on the 2nd (one
    wrong: the same); bundle b: 3 on the 2nd (a 7 said to be a 1); one label posted without
    the app's answer."""
    day1, day2 = "2026-12-01T10:00:0{}.000Z", "2026-12-02T10:00:0{}.000Z"
    return [_record(3, 3, "a", day1.format(0), 0), _record(9, 3, "a", day1.format(1), 1),
            _record(5, 5, "a", day1.format(2), 2), _record(6, 6, "a", day1.format(3), 3),
            _record(9, 3, "a", day2.format(0), 4), _record(2, 2, "a", day2.format(1), 5),
            _record(7, 1, "b", day2.format(2), 6), _record(1, 1, "b", day2.format(3), 7),
            _record(4, 4, "b", day2.format(4), 8), _record(8, None, "b", day2.format(5), 9)]


def test_accuracy_per_bundle_and_day_counts_judged_answers_only(records):
    answers = answers_of(reversed(records))  # oldest first whatever the store's order
    assert [a.record_id for a in answers] == [r.id for r in records[:9]]
    by_day = [(r.bundle_version, r.day, r.answers, r.right)
              for r in accuracy_by_version(answers, by_day=True)]
    assert by_day == [("a", "2026-12-01", 4, 3), ("a", "2026-12-02", 2, 1),
                      ("b", "2026-12-02", 3, 2)]
    assert [(r.bundle_version, r.accuracy) for r in accuracy_by_version(answers, by_day=False)
            ] == [("a", pytest.approx(4 / 6)), ("b", pytest.approx(2 / 3))]
    corrections = top_corrections(answers)
    assert [(c.answered, c.label, c.count) for c in corrections] == [(3, 9, 2), (1, 7, 1)]


def test_the_alarm_needs_a_full_window_below_the_floor(records):
    answers = answers_of(records)
    latest = recent_accuracy(answers, window=5, floor=0.7)  # 3 right of the last 5
    assert (latest.answers, latest.right, latest.dropped) == (5, 3, True)
    assert not recent_accuracy(answers, window=5, floor=0.6).dropped  # 60% is not below
    assert not recent_accuracy(answers, window=20, floor=0.99).dropped  # only 9 answers
    report = monitor_report("store", records, MonitorSpec(last_answers=5, accuracy_floor=0.7),
                            [], None)
    assert (report.records, report.answers, report.accuracy) == (10, 9, pytest.approx(6 / 9))
    assert report.recent.dropped and report.metrics()["accuracy_dropped"] == 1.0
    assert "below the floor" in report.markdown()


def test_drawing_measures_read_ink_size_and_slant():
    image = np.zeros((2, 28, 28), np.uint8)
    for row in range(4, 24):  # a stroke leaning right: its top to the right
        image[0, row, 14 + (14 - row) // 3] = 255
        image[1, row, 14] = 255  # upright
    measures = drawing_measures(image)
    assert DRAWING_MEASURES == ("ink", "height_px", "width_px", "slant_deg")
    assert measures[:, 0].tolist() == [20.0, 20.0]
    assert measures[0, 3] == pytest.approx(18.4, abs=0.5) and measures[1, 3] == 0.0
    assert measures[1, 1] > 20 and measures[1, 2] == 0.0


def _digits(count, seed):
    """Bars of random height and place, as strokes drawn with a thin pen."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 28, 28), np.uint8)
    for image, top, column in zip(images, rng.integers(3, 10, count), rng.integers(8, 20, count),
                                  strict=True):
        image[top:top + 15, column] = 255
    return images.reshape(count, 784)


def _probabilities(count, confidence, seed):
    rng = np.random.default_rng(seed)
    probabilities = np.full((count, 10), (1 - confidence) / 9)
    probabilities[np.arange(count), rng.integers(0, 10, count)] = confidence
    return probabilities


def test_drift_flags_what_moved_and_only_that():
    reference = _digits(400, 0)
    same = _digits(200, 1)
    thick = grey_dilation(same.reshape(-1, 28, 28), size=(1, 1, 3)).reshape(-1, 784)
    probabilities = _probabilities(400, 0.9, 2)
    unmoved = {d.measure: d for d in drift_of(reference, probabilities, same,
                                              _probabilities(200, 0.9, 3))}
    assert list(unmoved) == [*DRAWING_MEASURES, "predicted_digit", "confidence"]
    assert not any(d.drifted for d in unmoved.values())
    moved = {d.measure: d for d in drift_of(reference, probabilities, thick,
                                            _probabilities(200, 0.6, 3))}
    assert moved["ink"].drifted and moved["ink"].live == pytest.approx(
        3 * moved["ink"].reference)
    assert moved["width_px"].drifted and moved["confidence"].drifted
    assert not moved["height_px"].drifted and not moved["predicted_digit"].drifted
    assert sum(moved["ink"].live_counts) == 200 and sum(moved["ink"].reference_counts) == 400


def _sample(value, **labels):
    """One sample of an instant vector, as Prometheus' HTTP API answers it."""
    return {"metric": labels, "value": [1733572800.0, str(value)]}


def test_prometheus_figures_read_every_answer_and_verdict(records):
    results = {
        "answers": [_sample(80, status="ok"), _sample(15, status="low_confidence"),
                    _sample(5, status="nothing_drawn")],
        "feedback": [_sample(9, verdict="right", bundle_version="a"),
                     _sample(1, verdict="wrong", bundle_version="a"),
                     _sample(0, verdict="right", bundle_version="b"),
                     _sample(0, verdict="wrong", bundle_version="b"),
                     _sample(4, verdict="unknown", bundle_version="b")],
        "requests": [_sample(118, status="200"), _sample(2, status="503")],
        "failed_reloads": [_sample(1, outcome="failed")],
        "predict_p99_seconds": [_sample("0.0125")],
        "serving": [_sample(1, bundle_version="b", model_version="7")]}
    traffic = traffic_figures("http://prometheus:9090", "1d", results)
    assert traffic.answers == 100 and traffic.answer_share("low_confidence") == 0.15
    assert traffic.judged_share == 0.1  # right and wrong, not labels without an answer
    assert [(v.bundle_version, v.accuracy) for v in traffic.verdicts_by_version] == [
        ("a", 0.9), ("b", None)]
    assert traffic.server_error_share == pytest.approx(2 / 120)
    assert (traffic.failed_reloads, traffic.predict_p99_seconds) == (1.0, 0.0125)
    assert traffic.serving == [("b", "7")]
    report = monitor_report("store", records, MonitorSpec(), [], None).with_traffic(traffic)
    assert report.metrics()["prometheus_low_confidence_share"] == 0.15
    assert report.to_json()["traffic"]["judged_share"] == 0.1
    assert "| `a` | 10 | 90.0% |" in report.markdown()
    assert "p99 12 ms" in report.markdown()


def test_prometheus_figures_of_a_quiet_window():
    """No answers: no shares, no p99 (Prometheus' quantile of nothing is NaN), and a p99
    above the largest bucket is +Inf, reported as such and kept out of MLflow's metrics."""
    empty = {"answers": [], "feedback": [], "requests": [], "failed_reloads": [],
             "predict_p99_seconds": [_sample("NaN")], "serving": []}
    quiet = traffic_figures("http://prometheus:9090", "1h", empty)
    assert quiet.answer_share("ok") is None and quiet.judged_share is None
    assert quiet.predict_p99_seconds is None and quiet.server_error_share is None
    assert set(quiet.metrics()) == {"prometheus_answers", "prometheus_failed_reloads"}
    slow = traffic_figures("http://prometheus:9090", "1h",
                           {**empty, "predict_p99_seconds": [_sample("+Inf")]})
    assert "prometheus_predict_p99_seconds" not in slow.metrics()
    assert any("above the largest latency bucket" in line for line in slow.markdown())


def test_the_prometheus_window_is_a_duration():
    assert traffic_queries("6h")["answers"] == (
        "sum by (status) (increase(mlpaint_predictions_total[6h]))")
    with pytest.raises(ValueError, match="prometheus_window"):
        MonitorSpec(prometheus_window="6 hours")


def test_a_prometheus_that_does_not_answer_is_named():
    from mlpaint.feedback.traffic import PrometheusError, live_traffic
    from mlpaint.processes import free_port

    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PrometheusError, match=rf"{nobody}: query answers failed"):
        live_traffic(nobody, "1h")
