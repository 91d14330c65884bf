"""Live use as the server's Prometheus metrics count it, over a recent window.

The feedback store sees only the drawings people chose to judge. Prometheus, scraping
`/metrics` of every server, sees every answer: how many, how often "not sure" or "nothing
drawn", how many of them people judged and, from those, the share judged right per served
bundle; and how the service itself did (the p99 latency of `/v1/predict`, server errors,
failed reloads). The monitor flow asks Prometheus these questions when its spec names a
Prometheus URL and reports them beside the store's figures.

Counts over the window come from PromQL's `increase()`, which cannot see a series' first
count (the server starts its series at 0 for this: `mlpaint.serving.metrics`) and
extrapolates from the last scrape to the window's end: they are estimates, reported
rounded. Shares of them, unaffected, are what the report leans on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import requests

_PREDICT_ROUTE = "/v1/predict"


def traffic_queries(window: str) -> dict[str, str]:
    """The PromQL the report is made of, each an instant vector over `window` (a Prometheus
    duration such as 1d or 6h)."""
    def increase(metric: str, by: str, selector: str = "") -> str:
        return f"sum by ({by}) (increase({metric}{selector}[{window}]))"

    return {
        "answers": increase("mlpaint_predictions_total", "status"),
        "feedback": increase("mlpaint_feedback_total", "verdict, bundle_version"),
        "requests": increase("mlpaint_http_requests_total", "status"),
        "failed_reloads": increase("mlpaint_model_reloads_total", "outcome",
                                   '{outcome="failed"}'),
        "predict_p99_seconds": "histogram_quantile(0.99, "
                               + increase("mlpaint_http_request_duration_seconds_bucket", "le",
                                          f'{{route="{_PREDICT_ROUTE}"}}') + ")",
        "serving": "max by (bundle_version, model_version) (mlpaint_model_info) == 1",
    }


@dataclass(frozen=True)
class VersionVerdicts:
    bundle_version: str
    right: float
    wrong: float

    @property
    def accuracy(self) -> float | None:
        judged = self.right + self.wrong
        return self.right / judged if judged else None


@dataclass(frozen=True)
class TrafficFigures:
    """What Prometheus counted over `window`. Counts are `increase()` estimates."""

    prometheus: str
    window: str
    answers_by_status: dict[str, float]  # ok, low_confidence, nothing_drawn
    feedback_by_verdict: dict[str, float]  # right, wrong, unknown
    verdicts_by_version: list[VersionVerdicts]
    requests_by_status: dict[str, float]  # HTTP status code
    failed_reloads: float
    predict_p99_seconds: float | None  # None: no predictions in the window
    serving: list[tuple[str, str]]  # (bundle version, model version) live now

    @property
    def answers(self) -> float:
        return sum(self.answers_by_status.values())

    def answer_share(self, status: str) -> float | None:
        return self.answers_by_status.get(status, 0.0) / self.answers if self.answers else None

    @property
    def judged_share(self) -> float | None:
        """Of the answers given, the share people judged Right or Wrong."""
        judged = sum(v for k, v in self.feedback_by_verdict.items() if k != "unknown")
        return min(judged / self.answers, 1.0) if self.answers else None

    @property
    def server_error_share(self) -> float | None:
        total = sum(self.requests_by_status.values())
        errors = sum(v for k, v in self.requests_by_status.items() if k.startswith("5"))
        return errors / total if total else None

    def to_json(self) -> dict:
        return {**asdict(self), "answers": self.answers,
                "low_confidence_share": self.answer_share("low_confidence"),
                "nothing_drawn_share": self.answer_share("nothing_drawn"),
                "judged_share": self.judged_share,
                "server_error_share": self.server_error_share}

    def metrics(self) -> dict[str, float]:
        """The figures for the monitor's MLflow run, prefixed `prometheus_`."""
        figures = {"answers": self.answers, "failed_reloads": self.failed_reloads,
                   "low_confidence_share": self.answer_share("low_confidence"),
                   "nothing_drawn_share": self.answer_share("nothing_drawn"),
                   "judged_share": self.judged_share,
                   "server_error_share": self.server_error_share,
                   "predict_p99_seconds": self.predict_p99_seconds}
        return {f"prometheus_{name}": float(value) for name, value in figures.items()
                if value is not None and math.isfinite(value)}

    def markdown(self) -> list[str]:
        serving = ", ".join(f"`{bundle}` (model {model})" for bundle, model in self.serving)
        p99 = ("n/a" if self.predict_p99_seconds is None
               else "above the largest latency bucket" if math.isinf(self.predict_p99_seconds)
               else f"{1000 * self.predict_p99_seconds:.0f} ms")
        lines = ["", f"## Traffic over the last {self.window} (Prometheus at {self.prometheus})",
                 f"- serving now: {serving or 'no live server scraped'}",
                 f"- about {self.answers:.0f} answers: {percent(self.answer_share('ok'))} plain, "
                 f"{percent(self.answer_share('low_confidence'))} \"not sure\", "
                 f"{percent(self.answer_share('nothing_drawn'))} \"nothing drawn\"",
                 f"- people judged {percent(self.judged_share)} of them",
                 f"- `/v1/predict` p99 {p99}; server errors "
                 f"{percent(self.server_error_share)} of requests; failed reloads "
                 f"{self.failed_reloads:.0f}"]
        judged = [v for v in self.verdicts_by_version if v.accuracy is not None]
        if judged:
            lines += ["", "| bundle | judged | right |", "|---|---|---|"]
            lines += [f"| `{v.bundle_version}` | {v.right + v.wrong:.0f} | {v.accuracy:.1%} |"
                      for v in judged]
        return lines


def percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.1%}"


def _value(sample: dict) -> float:
    return float(sample["value"][1])


def _by(result: list[dict], label: str) -> dict[str, float]:
    return {sample["metric"].get(label, ""): _value(sample) for sample in result}


def traffic_figures(prometheus: str, window: str,
                    results: dict[str, list[dict]]) -> TrafficFigures:
    """The figures from the instant-vector results of `traffic_queries` (Prometheus' JSON
    `data.result` lists, by query name). A histogram quantile over no observations is NaN:
    no p99 then."""
    versions: dict[str, dict[str, float]] = {}
    for sample in results["feedback"]:
        verdicts = versions.setdefault(sample["metric"].get("bundle_version", "unknown"), {})
        verdicts[sample["metric"].get("verdict", "unknown")] = _value(sample)
    p99 = [_value(sample) for sample in results["predict_p99_seconds"]]
    return TrafficFigures(
        prometheus=prometheus, window=window,
        answers_by_status=_by(results["answers"], "status"),
        feedback_by_verdict={verdict: sum(v.get(verdict, 0.0) for v in versions.values())
                             for verdict in ("right", "wrong", "unknown")},
        verdicts_by_version=[VersionVerdicts(version, v.get("right", 0.0), v.get("wrong", 0.0))
                             for version, v in sorted(versions.items())],
        requests_by_status=_by(results["requests"], "status"),
        failed_reloads=sum(_value(sample) for sample in results["failed_reloads"]),
        # NaN when nothing was observed; +Inf, kept, when above the largest bucket.
        predict_p99_seconds=p99[0] if p99 and not math.isnan(p99[0]) else None,
        serving=sorted((s["metric"].get("bundle_version", ""), s["metric"].get("model_version", ""))
                       for s in results["serving"]))


class PrometheusError(RuntimeError):
    """Prometheus did not answer a query, or answered with an error."""


def query_prometheus(url: str, queries: dict[str, str], timeout_s: float = 30) -> dict[str, list]:
    """Each query's instant-vector result from Prometheus' HTTP API at `url`."""
    results = {}
    with requests.Session() as session:
        for name, query in queries.items():
            try:
                response = session.get(f"{url.rstrip('/')}/api/v1/query",
                                       params={"query": query}, timeout=timeout_s)
                body = response.json()
            except (requests.RequestException, ValueError) as exc:
                raise PrometheusError(f"{url}: query {name} failed: {exc}") from exc
            if response.status_code != 200 or body.get("status") != "success":
                raise PrometheusError(f"{url}: query {name} ({query}) answered "
                                      f"{response.status_code}: {body.get('error', body)}")
            results[name] = body["data"]["result"]
    return results


def live_traffic(url: str, window: str) -> TrafficFigures:
    """Ask Prometheus at `url` what the servers it scrapes counted over `window`."""
    return traffic_figures(url, window, query_prometheus(url, traffic_queries(window)))
