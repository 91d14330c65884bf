"""Live accuracy and drift from what people answered on the page.

Every "Right" or "Wrong — it is a …" answer is a feedback record holding what the app had
said (`answered_digit`), what the person says it is (`label`), the bundle that answered and
when. They are the only ground truth from real use: this module turns them into the share of
right answers per served bundle and day, the answers most often corrected, the accuracy of
the last N answers against a floor, and how far what people draw has moved from the
training digits (ink, size, slant, the mix of digits the model reads, its confidence), each
compared with SciPy's two-sample tests. Pure functions on records and arrays; the monitor
flow (flows/monitor.py) reads the store, the served bundle and the training rows, and
reports.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlpaint.data.pins import N_CLASSES
from mlpaint.feedback.store import FeedbackRecord
from mlpaint.feedback.traffic import TrafficFigures
from mlpaint.model.features import DRAWING_MEASURES, drawing_measures

#: The Prefect event the monitor flow emits when the last answers' accuracy is below the
#: floor; an automation or a deployment trigger can act on it.
ACCURACY_DROPPED = "mlpaint.monitor.accuracy-dropped"
#: The MLflow experiment each monitor run is recorded in.
MONITOR_EXPERIMENT = "mlpaint-monitor"
# Below this p-value a measure counts as drifted; many measures are tested each run, so
# the bar is strict.
DRIFT_P_VALUE = 0.001
_HISTOGRAM_BINS = 20
#: Where a deployment's monitor finds Prometheus (the stack sets it for its workers).
PROMETHEUS_URL_ENV = "MLPAINT_PROMETHEUS_URL"


class MonitorSpec(BaseModel):
    """What a monitor run reads and when it raises the alarm (the flow's one parameter, the
    Prefect run form's fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feedback_store: str | None = Field(None, description="the feedback store the server "
                                       "appends to: a folder or s3://bucket/prefix (default "
                                       "$MLPAINT_FEEDBACK_STORE, else `feedback` beside the "
                                       "bundle destination)")
    bundle: str | None = Field(None, description="the destination the server follows; its "
                               "LATEST model reads both the drawings and the training rows "
                               "for the drift of its answers and confidence (default "
                               "$MLPAINT_BUNDLE_DIR or .mlpaint/bundles)")
    last_answers: int = Field(100, ge=1, description="the live accuracy checked against the "
                              "floor is that of this many latest answers")
    accuracy_floor: float = Field(0.9, ge=0, le=1, description="below it, over a full window "
                                  f"of latest answers, the run emits {ACCURACY_DROPPED}")
    reference_rows: int = Field(5000, ge=100, description="training digits sampled as the "
                                "reference of the drift measures")
    sources: list[str] | None = Field(None, description="MNIST sources of the training "
                                      "digits (default: the mirror chain)")
    seed: int = Field(0, description="the training digits' sample")
    prometheus_url: str | None = Field(None, description="a Prometheus scraping the servers' "
                                       "/metrics: the report adds every answer's traffic (not "
                                       "sure, nothing drawn, the share people judged, p99 "
                                       "latency) over the window (default "
                                       f"${PROMETHEUS_URL_ENV}; none: the store alone)")
    prometheus_window: str = Field("1d", pattern=r"^[1-9][0-9]*[smhdw]$", description="the "
                                   "window of the Prometheus figures, a duration such as 1d "
                                   "or 6h")

    def prometheus(self) -> str | None:
        """The Prometheus to ask: the spec's, else the environment's, else none."""
        return self.prometheus_url or os.environ.get(PROMETHEUS_URL_ENV) or None


@dataclass(frozen=True)
class Answer:
    """One answer a person judged: what the app said, what the digit is, who said it when."""

    record_id: str
    received_at: datetime
    bundle_version: str
    answered: int
    label: int

    @property
    def right(self) -> bool:
        return self.answered == self.label

    @property
    def day(self) -> str:
        return self.received_at.date().isoformat()


def answers_of(records: Iterable[FeedbackRecord]) -> list[Answer]:
    """The records that judge an answer (the app had said something), oldest first. Records
    posted without the app's answer are labels only: they say nothing of accuracy."""
    answers = [Answer(record.id, datetime.fromisoformat(record.received_at),
                      record.bundle_version or "unknown", record.answered_digit, record.label)
               for record in records if record.answered_digit is not None]
    return sorted(answers, key=lambda answer: (answer.received_at, answer.record_id))


@dataclass(frozen=True)
class AccuracyRow:
    bundle_version: str
    day: str  # ISO date, or "all" for the version's whole service
    answers: int
    right: int

    @property
    def accuracy(self) -> float:
        return self.right / self.answers

    def to_json(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy}


def accuracy_by_version(answers: list[Answer], *, by_day: bool) -> list[AccuracyRow]:
    """The share of right answers per served bundle (and per day with `by_day`): the
    bundles in the order they first answered, each one's days in order."""
    groups: dict[tuple[str, str], list[bool]] = {}
    first_answer: dict[str, int] = {}
    for index, answer in enumerate(answers):
        first_answer.setdefault(answer.bundle_version, index)
        key = (answer.bundle_version, answer.day if by_day else "all")
        groups.setdefault(key, []).append(answer.right)
    return [AccuracyRow(version, day, len(rights), sum(rights))
            for (version, day), rights in sorted(
                groups.items(), key=lambda item: (first_answer[item[0][0]], item[0][1]))]


@dataclass(frozen=True)
class Correction:
    answered: int  # what the app said
    label: int  # what people said it is
    count: int


def top_corrections(answers: list[Answer], count: int = 5) -> list[Correction]:
    """The wrong answers people corrected most often, as (said, is) pairs, most first."""
    pairs = collections.Counter((a.answered, a.label) for a in answers if not a.right)
    return [Correction(said, label, n) for (said, label), n in
            sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:count]]


@dataclass(frozen=True)
class RecentAccuracy:
    """The accuracy of the latest answers against the floor. Raised only over a full window:
    three answers, one wrong, are not an accuracy drop."""

    window: int
    answers: int
    right: int
    floor: float

    @property
    def accuracy(self) -> float | None:
        return self.right / self.answers if self.answers else None

    @property
    def dropped(self) -> bool:
        return self.answers >= self.window and self.right < self.floor * self.answers

    def to_json(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy, "dropped": self.dropped}


def recent_accuracy(answers: list[Answer], window: int, floor: float) -> RecentAccuracy:
    latest = answers[-window:]
    return RecentAccuracy(window, len(latest), sum(a.right for a in latest), floor)


@dataclass(frozen=True)
class Drift:
    """One measure of the drawings against the training digits: a summary of each side, the
    two-sample test's statistic and p-value, and both sides' histograms over shared bins."""

    measure: str
    test: str  # "ks" (Kolmogorov-Smirnov) or "chi2" (contingency of counts)
    reference: float  # median (ks) or the largest share (chi2)
    live: float
    statistic: float
    p_value: float
    bins: list[float]  # edges (ks) or categories (chi2)
    reference_counts: list[int]
    live_counts: list[int]

    @property
    def drifted(self) -> bool:
        return self.p_value < DRIFT_P_VALUE

    def to_json(self) -> dict:
        return {**asdict(self), "drifted": self.drifted}


def _continuous_drift(measure: str, reference: np.ndarray, live: np.ndarray) -> Drift:
    from scipy.stats import ks_2samp

    test = ks_2samp(reference, live)
    edges = np.histogram_bin_edges(np.concatenate([reference, live]), bins=_HISTOGRAM_BINS)
    return Drift(measure, "ks", float(np.median(reference)), float(np.median(live)),
                 float(test.statistic), float(test.pvalue), edges.tolist(),
                 np.histogram(reference, edges)[0].tolist(), np.histogram(live, edges)[0].tolist())


def _digit_mix_drift(reference_digits: np.ndarray, live_digits: np.ndarray) -> Drift:
    """Whether the model reads the digits in other proportions on the drawings than on the
    training digits: a chi-squared test of the 2 x 10 table (digits neither side has are
    left out: the test needs every expected count above zero)."""
    from scipy.stats import chi2_contingency

    reference = np.bincount(reference_digits, minlength=N_CLASSES)
    live = np.bincount(live_digits, minlength=N_CLASSES)
    seen = (reference + live) > 0
    if seen.sum() < 2:
        statistic, p_value = 0.0, 1.0
    else:
        result = chi2_contingency(np.stack([reference[seen], live[seen]]))
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return Drift("predicted_digit", "chi2", float(reference.max() / reference.sum()),
                 float(live.max() / live.sum()), statistic, p_value,
                 list(map(float, range(N_CLASSES))), reference.tolist(), live.tolist())


def drift_of(reference_pixels: np.ndarray, reference_probabilities: np.ndarray,
             live_pixels: np.ndarray, live_probabilities: np.ndarray) -> list[Drift]:
    """Each drawing measure (ink, height, width, slant), the digit the model reads and its
    confidence (the top probability), on the drawings against the training digits."""
    reference = drawing_measures(reference_pixels)
    live = drawing_measures(live_pixels)
    drifts = [_continuous_drift(name, reference[:, column], live[:, column])
              for column, name in enumerate(DRAWING_MEASURES)]
    drifts.append(_digit_mix_drift(reference_probabilities.argmax(axis=1),
                                   live_probabilities.argmax(axis=1)))
    drifts.append(_continuous_drift("confidence", reference_probabilities.max(axis=1),
                                    live_probabilities.max(axis=1)))
    return drifts


@dataclass(frozen=True)
class MonitorReport:
    store: str
    bundle_version: str | None  # the LATEST whose model measured the drift
    records: int  # accepted records read
    answers: int  # those judging an answer
    by_version: list[AccuracyRow]
    by_version_and_day: list[AccuracyRow]
    corrections: list[Correction]
    recent: RecentAccuracy
    drift: list[Drift] = field(default_factory=list)
    traffic: TrafficFigures | None = None  # what Prometheus counted, when one was asked

    def with_traffic(self, traffic: TrafficFigures) -> MonitorReport:
        return replace(self, traffic=traffic)

    @property
    def accuracy(self) -> float | None:
        right = sum(row.right for row in self.by_version)
        return right / self.answers if self.answers else None

    def to_json(self) -> dict:
        return {"store": self.store, "bundle_version": self.bundle_version,
                "records": self.records, "answers": self.answers, "accuracy": self.accuracy,
                "by_version": [row.to_json() for row in self.by_version],
                "by_version_and_day": [row.to_json() for row in self.by_version_and_day],
                "corrections": [asdict(c) for c in self.corrections],
                "recent": self.recent.to_json(),
                "drift": [d.to_json() for d in self.drift],
                "traffic": self.traffic.to_json() if self.traffic else None}

    def metrics(self) -> dict[str, float]:
        """The run's figures for MLflow: overall and recent accuracy, each drift's p-value."""
        metrics = {"answers": float(self.answers), "records": float(self.records)}
        if self.accuracy is not None:
            metrics["live_accuracy"] = self.accuracy
        if self.recent.accuracy is not None:
            metrics["recent_accuracy"] = self.recent.accuracy
        metrics["accuracy_dropped"] = float(self.recent.dropped)
        for drift in self.drift:
            metrics[f"drift_{drift.measure}_statistic"] = drift.statistic
            metrics[f"drift_{drift.measure}_p_value"] = drift.p_value
        if self.traffic:
            metrics.update(self.traffic.metrics())
        return metrics

    def markdown(self) -> str:
        lines = [f"# Live accuracy of `{self.store}`", ""]
        if not self.answers:
            lines.append(f"No answers judged yet ({self.records} records, none with the "
                         "app's answer).")
        else:
            recent = self.recent
            state = ("**below the floor**" if recent.dropped else
                     "not yet a full window" if recent.answers < recent.window else
                     "above the floor")
            lines += [f"- {self.answers} answers judged, **{self.accuracy:.1%}** right",
                      f"- the last {recent.answers}: {recent.accuracy:.1%} right, floor "
                      f"{recent.floor:.0%} over {recent.window}: {state}", "",
                      "| bundle | day | answers | right |", "|---|---|---|---|"]
            lines += [f"| `{row.bundle_version}` | {row.day} | {row.answers} | "
                      f"{row.accuracy:.1%} |" for row in self.by_version_and_day]
            if self.corrections:
                lines += ["", "Most corrected: " + ", ".join(
                    f"{c.answered} that was a {c.label} ({c.count})" for c in self.corrections)]
        if self.drift:
            lines += ["", "## Drift against the training digits (model of "
                          f"`{self.bundle_version}`)",
                      "Medians (for the digit read: the most frequent digit's share) and "
                      f"SciPy's two-sample test; drifted below p = {DRIFT_P_VALUE}.", "",
                      "| measure | training | drawings | statistic | p-value | drifted |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {d.measure} | {d.reference:.3g} | {d.live:.3g} | {d.statistic:.3f} | "
                      f"{d.p_value:.2g} | {'yes' if d.drifted else 'no'} |" for d in self.drift]
        if self.traffic:
            lines += self.traffic.markdown()
        return "\n".join(lines)


def monitor_report(store: str, records: list[FeedbackRecord], spec: MonitorSpec,
                   drift: list[Drift], bundle_version: str | None) -> MonitorReport:
    answers = answers_of(records)
    return MonitorReport(
        store=store, bundle_version=bundle_version, records=len(records), answers=len(answers),
        by_version=accuracy_by_version(answers, by_day=False),
        by_version_and_day=accuracy_by_version(answers, by_day=True),
        corrections=top_corrections(answers),
        recent=recent_accuracy(answers, spec.last_answers, spec.accuracy_floor), drift=drift)


def write_plots(report: MonitorReport, folder) -> list:
    """live_accuracy.png (each bundle's share of right answers per day) and drift.png (each
    drift measure's histogram, training digits against drawings, as shares), into `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if report.by_version_and_day:
        figure, axes = plt.subplots(figsize=(8, 4))
        for version in dict.fromkeys(row.bundle_version for row in report.by_version_and_day):
            rows = [row for row in report.by_version_and_day if row.bundle_version == version]
            axes.plot([row.day for row in rows], [row.accuracy for row in rows], marker="o",
                      label=version)
        axes.axhline(report.recent.floor, color="red", linestyle="--", label="floor")
        axes.set_ylim(0, 1.02)
        axes.set_ylabel("right answers")
        axes.set_title("Live accuracy per served bundle and day")
        axes.legend(fontsize="small")
        figure.autofmt_xdate()
        figure.tight_layout()
        figure.savefig(folder / "live_accuracy.png", dpi=100)
        plt.close(figure)
        written.append(folder / "live_accuracy.png")
    if report.drift:
        figure, grid = plt.subplots(2, 3, figsize=(12, 6))
        for axes, drift in zip(grid.flat, report.drift, strict=False):
            reference = np.asarray(drift.reference_counts, float)
            live = np.asarray(drift.live_counts, float)
            if drift.test == "ks":
                centres = (np.asarray(drift.bins[:-1]) + np.asarray(drift.bins[1:])) / 2
                width = drift.bins[1] - drift.bins[0]
            else:
                centres, width = np.asarray(drift.bins), 0.9
            axes.bar(centres, reference / max(reference.sum(), 1), width=width, alpha=0.5,
                     label="training digits")
            axes.bar(centres, live / max(live.sum(), 1), width=width, alpha=0.5,
                     label="drawings")
            axes.set_title(f"{drift.measure} (p = {drift.p_value:.2g})", fontsize="small")
        grid.flat[0].legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(folder / "drift.png", dpi=100)
        plt.close(figure)
        written.append(folder / "drift.png")
    return written
