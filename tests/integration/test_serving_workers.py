"""`mlpaint serve --workers 2` as its own process: two uvicorn workers each load the bundle,
answer requests, and each swaps to a newer bundle when LATEST moves."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import requests

from mlpaint.data.pins import Split
from mlpaint.processes import free_port, start_service, stop_service
from tests.conftest import counted_samples, metric_samples, wait_for
from tests.integration.conftest import build_and_publish

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _versions_seen(url: str, requests_count: int) -> set[str]:
    """Bundle versions reported over fresh connections, so the kernel spreads them over the
    workers (a kept-alive connection would stay with one)."""
    seen = set()
    for _ in range(requests_count):
        response = requests.get(f"{url}/readyz", timeout=10)
        assert response.status_code == 200, response.text
        seen.add(response.json()["bundle_version"])
    return seen


def test_two_workers_serve_and_both_follow_latest(small_model, mnist_tables, tmp_path):
    build_and_publish(small_model, mnist_tables, tmp_path, "1", rows=300)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_service(
        [str(Path(sys.executable).parent / "mlpaint"), "serve", "--bundle",
         str(tmp_path / "bundles"), "--port", str(port), "--workers", "2",
         "--watch-seconds", "0.5"], f"{url}/readyz", log=tmp_path / "serve.log",
        timeout_s=120)
    try:
        wait_for(lambda: len(_children(process.pid)) >= 2, "uvicorn's two workers",
                 interval_s=0.5)
        digit = [int(v) for v in mnist_tables[Split.TEST].pixels[0]]
        for _ in range(20):
            response = requests.post(f"{url}/v1/predict", json={"pixels": digit}, timeout=10)
            assert response.status_code == 200, response.text
        first = _versions_seen(url, 20)
        assert len(first) == 1

        build_and_publish(small_model, mnist_tables, tmp_path, "2", rows=300)
        wait_for(lambda: _versions_seen(url, 1) != first, "a worker to serve version 2")
        time.sleep(2)  # every worker's watcher has had several chances to look
        second = _versions_seen(url, 40)
        assert len(second) == 1 and second != first, (first, second)

        # /metrics, from whichever worker answers, counts both workers' requests.
        for _ in range(3):
            text = requests.get(f"{url}/metrics", timeout=10).text
            answers = counted_samples(text, "mlpaint_predictions_total")
            assert sum(answers.values()) == 20, answers
            assert {dict(labels)["endpoint"] for labels in answers} == {"predict"}
            served = metric_samples(text, "mlpaint_http_requests_total")
            assert served[(("method", "POST"), ("route", "/v1/predict"),
                           ("status", "200"))] == 20
            timed = metric_samples(text, "mlpaint_http_request_duration_seconds_count")
            assert timed[(("method", "POST"), ("route", "/v1/predict"))] == 20
            info = metric_samples(text, "mlpaint_model_info")
            by_version = {dict(labels)["bundle_version"]: value
                          for labels, value in info.items()}
            assert by_version == {next(iter(first)): 0.0, next(iter(second)): 1.0}, info
            reloads = counted_samples(text, "mlpaint_model_reloads_total")
            assert reloads == {(("outcome", "swapped"),): 2.0}, reloads  # one per worker
    finally:
        stop_service(process)
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log[-3000:]
