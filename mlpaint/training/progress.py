"""How far a fit has got, while it trains: the rounds done of all, the watched rows' score
every few rounds and an estimate of the time left, passed to whoever watches (the log, a
Prefect progress artifact, a terminal bar), and kept as the fit's learning curve.

`FitMonitor` is a LightGBM callback. The rows it watches are scored by LightGBM itself, as a
validation set (the trees it adds each round are applied to them, and the metrics computed),
which does not change what is trained. The one thing that ends a fit early is its run
ending (`should_stop`): a fit trained in a thread cannot be interrupted otherwise, and would
train every remaining round before its process could exit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Metrics LightGBM computes on the watched rows each round (for multiclass and
# multiclassova alike).
WATCHED_METRICS = ["multi_logloss", "multi_error"]
# Points in a fit's learning curve (and reports to its watchers), at most, give or take one.
CURVE_POINTS = 50


@dataclass(frozen=True)
class CurvePoint:
    """The watched rows' score after `round` rounds, `seconds` into the fit."""

    round: int
    seconds: float
    log_loss: float
    accuracy: float

    def to_json(self) -> dict[str, float]:
        return {"round": self.round, "seconds": self.seconds,
                "log_loss": self.log_loss, "accuracy": self.accuracy}


@dataclass(frozen=True)
class FitProgress:
    """One report: `fit` (its name) has done `rounds_done` of `rounds_total` rounds in
    `seconds`; `latest` is the watched rows' latest score (None: no rows watched)."""

    fit: str
    rounds_done: int
    rounds_total: int
    seconds: float
    watched: str  # what the watched rows are, in words ("held-out rows")
    latest: CurvePoint | None

    @property
    def fraction(self) -> float:
        return self.rounds_done / self.rounds_total if self.rounds_total else 1.0

    @property
    def seconds_left(self) -> float | None:
        """At the pace so far (rounds take about as long early as late in a boosting run);
        None before the first round."""
        if not self.rounds_done:
            return None
        return self.seconds / self.rounds_done * (self.rounds_total - self.rounds_done)

    def describe(self) -> str:
        text = (f"{self.fit}: round {self.rounds_done} of {self.rounds_total} "
                f"({100 * self.fraction:.0f}%)")
        if self.latest is not None:
            text += (f", {self.watched}: accuracy {self.latest.accuracy:.4f}, log-loss "
                     f"{self.latest.log_loss:.4f}")
        left = self.seconds_left
        if left is not None and self.rounds_done < self.rounds_total:
            text += f", about {_duration(left)} left"
        return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


ProgressWatcher = Callable[[FitProgress], None]


class FitStoppedError(RuntimeError):
    """A fit stopped between two rounds because the run it belongs to is ending."""


class FitMonitor:
    """A LightGBM callback reporting a fit's progress to `watchers` every `report_every`
    rounds and at its last round, and keeping the learning curve (`curve`).

    A fit of several boosting runs (the bags of bagged boosting) counts its rounds across
    them: `start_stage(rounds_before)` before each run. `should_stop` is asked after every
    round; once it answers true the fit raises `FitStoppedError`."""

    order = 40  # after LightGBM's own callbacks (record_evaluation is 20)
    before_iteration = False

    def __init__(self, fit: str, rounds_total: int, watchers: Sequence[ProgressWatcher] = (),
                 *, watched: str = "watched rows", report_every: int | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.fit = fit
        self.should_stop = should_stop
        self.rounds_total = rounds_total
        self.watchers = list(watchers)
        self.watched = watched
        self.report_every = report_every or max(1, rounds_total // CURVE_POINTS)
        self.clock = clock
        self.started = clock()
        self.rounds_before = 0
        self.curve: list[CurvePoint] = []

    def start_stage(self, rounds_before: int) -> None:
        self.rounds_before = rounds_before

    def __call__(self, env: Any) -> None:
        done = self.rounds_before + env.iteration + 1
        if self.should_stop is not None and self.should_stop():
            raise FitStoppedError(f"{self.fit}: stopped after round {done} of "
                                  f"{self.rounds_total}: its run is ending")
        if done % self.report_every and done != self.rounds_total \
                and env.iteration + 1 != env.end_iteration:
            return
        self.report(done, _watched_scores(env.evaluation_result_list or []))

    def report(self, done: int, scores: dict[str, float] | None) -> FitProgress:
        seconds = self.clock() - self.started
        point = None
        if scores is not None:
            # Plain floats, to the millisecond: as the fit's record stores them.
            point = CurvePoint(done, round(seconds, 3), float(scores["multi_logloss"]),
                               1.0 - float(scores["multi_error"]))
            self.curve.append(point)
        progress = FitProgress(self.fit, done, self.rounds_total, seconds, self.watched, point)
        for watch in self.watchers:
            watch(progress)
        return progress


def _watched_scores(results: list) -> dict[str, float] | None:
    """The watched rows' metrics from LightGBM's evaluation list (dataset name, metric name,
    value, higher-is-better), None when it holds neither metric."""
    scores = {metric: value for _, metric, value, *_ in results if metric in WATCHED_METRICS}
    return scores if len(scores) == len(WATCHED_METRICS) else None


class EveryTenth:
    """A watcher passing on only the reports that cross the next tenth of the fit (and the
    last), so a log shows ten lines a fit rather than one per report."""

    def __init__(self, watch: ProgressWatcher) -> None:
        self.watch = watch
        self.next_fraction = 0.1

    def __call__(self, progress: FitProgress) -> None:
        if progress.fraction + 1e-9 >= self.next_fraction or progress.fraction >= 1.0:
            self.watch(progress)
            while self.next_fraction <= progress.fraction + 1e-9:
                self.next_fraction += 0.1


class AtMostEvery:
    """A watcher passing on at most one report every `seconds` (and always the last), for
    watchers that cost a request."""

    def __init__(self, watch: ProgressWatcher, seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.watch = watch
        self.seconds = seconds
        self.clock = clock
        self.last: float | None = None

    def __call__(self, progress: FitProgress) -> None:
        now = self.clock()
        if (self.last is None or now - self.last >= self.seconds
                or progress.rounds_done >= progress.rounds_total):
            self.last = now
            self.watch(progress)
