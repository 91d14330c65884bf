"""The server's Prometheus metrics, counted across every uvicorn worker.

Uvicorn's workers are separate processes, so each keeps its counts in prometheus_client's
multiprocess files (`PROMETHEUS_MULTIPROC_DIR`, which `mlpaint serve` creates empty for each
start and hands to every worker) and `/metrics`, whichever worker answers it, adds up all of
them. A server started without that folder (the app built in a test, or by another ASGI
server) counts in its own process and reports that.

What is counted: requests and their latency per route and status; every answer given (by
endpoint, digit and status: ok, low_confidence, nothing_drawn); every feedback post (by
verdict: right, wrong or unknown, and the bundle it judged); which bundle and model version
each worker serves; reloads that swapped or failed. Label values come from a fixed set (the
route templates, digits, statuses) or from bundle versions, which change a few times a week,
so the series stay few.

Every answer, reload and feedback series the server can count, and the requests (success
and server errors) and latency of the answering routes, start at 0 (the feedback series
when a bundle starts serving), as Prometheus' instrumentation guide advises: a series born
at its first count hides that count from `increase()` and `rate()`, and the monitor's
window figures would miss a new server's first "not sure" or first error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Scoring and explaining one drawing take milliseconds; a batch of 256 or a cold bundle
#: download takes up to seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
UNMATCHED_ROUTE = "unmatched"
#: The endpoints that answer with digits (by name and route), and each answer's digit and
#: status.
ANSWERING_ROUTES = {"predict": "/v1/predict", "explain": "/v1/explain"}
_ANSWER_LABELS = [(str(digit), status) for digit in range(10)
                  for status in ("ok", "low_confidence")] + [("none", "nothing_drawn")]
_VERDICTS = ("right", "wrong", "unknown")
# An answering route's success and its server errors (a fault, no model loaded): the first
# error must count in increase() too. Refusals of a request (4xx) start at their first.
_ANSWERING_STATUSES = ("200", "500", "503")


def multiprocess_mode() -> bool:
    """Whether this process counts in the shared folder. prometheus_client chooses when it is
    first imported, so the folder must be in the environment before that."""
    return (bool(os.environ.get(MULTIPROC_DIR_ENV))
            and values.ValueClass is not values.MutexValue)


class ServerMetrics:
    """The app's metrics, in a registry of their own so two apps in one process (tests) do
    not collide; in multiprocess mode every process's files are what `/metrics` reads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.shared = multiprocess_mode()
        register = {"registry": self.registry}
        self.requests = Counter(
            "mlpaint_http_requests", "HTTP requests answered, by route and status",
            ["method", "route", "status"], **register)
        self.latency = Histogram(
            "mlpaint_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route",
            ["method", "route"], buckets=LATENCY_BUCKETS, **register)
        self.predictions = Counter(
            "mlpaint_predictions", "Answers given, by endpoint, digit and status (ok, "
            "low_confidence, nothing_drawn; digit 'none' when nothing was drawn)",
            ["endpoint", "digit", "status"], **register)
        self.feedback = Counter(
            "mlpaint_feedback", "Feedback posts stored, by verdict on the app's answer (right, "
            "wrong, unknown when the client did not say what it was told) and the bundle "
            "that answered", ["verdict", "bundle_version"], **register)
        self.served = Gauge(
            "mlpaint_model_info", "1 for the bundle and model version a live worker serves",
            ["bundle_version", "model_version"], multiprocess_mode="livemax", **register)
        self.reloads = Counter(
            "mlpaint_model_reloads", "Bundle reloads, by outcome (swapped, failed)",
            ["outcome"], **register)
        self._serving: tuple[str, str] | None = None
        for endpoint, route in ANSWERING_ROUTES.items():
            self.latency.labels("POST", route)
            for status in _ANSWERING_STATUSES:
                self.requests.labels("POST", route, status)
            for digit, status in _ANSWER_LABELS:
                self.predictions.labels(endpoint, digit, status)
        for outcome in ("swapped", "failed"):
            self.reloads.labels(outcome)

    def count_answers(self, endpoint: str, answers: Iterable[tuple[int | None, str]]) -> None:
        for digit, status in answers:
            self.predictions.labels(endpoint, "none" if digit is None else str(digit),
                                    status).inc()

    def count_feedback(self, label: int, answered_digit: int | None,
                       bundle_version: str | None) -> None:
        verdict = ("unknown" if answered_digit is None
                   else "right" if answered_digit == label else "wrong")
        self.feedback.labels(verdict, bundle_version or "unknown").inc()

    def now_serving(self, bundle_version: str, model_version: str) -> None:
        """Mark what this worker serves; the bundle it served before (a swap) drops to 0."""
        if self._serving is not None:
            self.served.labels(*self._serving).set(0)
            self.count_reload(swapped=True)
        self._serving = (bundle_version, model_version)
        self.served.labels(*self._serving).set(1)
        for verdict in _VERDICTS:
            self.feedback.labels(verdict, bundle_version)

    def count_reload(self, swapped: bool) -> None:
        self.reloads.labels("swapped" if swapped else "failed").inc()

    def exposition(self) -> bytes:
        """The text `/metrics` answers: every worker's counts in multiprocess mode."""
        if not self.shared:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        return generate_latest(combined)

    content_type = CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware timing and counting every HTTP request by its route template (the
    path with its parameters unfilled, so /v1/examples?digit=3 and ?digit=4 are one route)."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before responding

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
