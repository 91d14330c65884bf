"""POST /v1/feedback on the real app and a real bundle; then on `mlpaint serve` processes
with two workers posting at once, a real Prefect server receiving the events, and the
`mlpaint feedback` review commands reading what they stored."""

from __future__ import annotations

import base64
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image

from mlpaint.data.pins import Split
from mlpaint.feedback.store import FeedbackStore
from mlpaint.images.preprocess import image_to_mnist
from mlpaint.processes import free_port, start_service, stop_service
from mlpaint.serving.app import create_app
from tests.conftest import counted_samples, prefect_events, run_cli, wait_for


def _png(pixels: np.ndarray) -> bytes:
    """A test digit drawn as on the page: black ink on white, 10x larger."""
    big = Image.fromarray(pixels.reshape(28, 28)).resize((280, 280), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    Image.fromarray(255 - np.asarray(big)).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture
def feedback_app(bundle_root, tmp_path):
    def make(**kwargs):
        return TestClient(create_app(str(bundle_root / "bundles"), watch_interval_s=0,
                                     feedback_store=str(tmp_path / "feedback"), **kwargs))
    return make


def test_a_correction_is_stored_as_received_with_its_preprocessing(feedback_app, mnist_tables,
                                                                     tmp_path):
    test = mnist_tables[Split.TEST]
    png = _png(np.asarray(test.pixels[0]))
    with feedback_app() as client:
        answer = client.post("/v1/predict", json={"image": _data_url(png)}).json()
        (prediction,) = answer["predictions"]
        body = {"image": _data_url(png), "label": 3, "digit": prediction["digit"],
                "bundle_version": prediction["bundle_version"]}
        first = client.post("/v1/feedback", json=body)
        assert first.status_code == 201, first.text
        again = client.post("/v1/feedback", json=body)
        assert again.status_code == 200 and again.json() == {**first.json(), "created": False}
    record = FeedbackStore.at(str(tmp_path / "feedback")).get(first.json()["id"])
    assert record.drawing == png and record.drawing_media_type == "image/png"
    assert np.array_equal(record.pixels.reshape(28, 28),
                          image_to_mnist(Image.open(io.BytesIO(png))))
    assert record.label == 3 and record.answered_digit == prediction["digit"]
    assert record.bundle_version == prediction["bundle_version"] and record.model_version == "1"
    assert record.received_at.endswith("Z")
    stored = json.loads(next((tmp_path / "feedback" / "records").iterdir()).read_text())
    assert not {"ip", "client", "address", "cookie", "user_agent"} & set(stored)


def test_bad_feedback_is_told_what_to_fix(feedback_app, mnist_tables):
    digit = [int(v) for v in mnist_tables[Split.TEST].pixels[1]]
    blank = io.BytesIO()
    Image.new("RGB", (280, 280), "white").save(blank, format="PNG")
    with feedback_app() as client:
        out_of_range = client.post("/v1/feedback", json={"pixels": digit, "label": 10})
        assert out_of_range.status_code == 422 and out_of_range.json()["detail"][0]["loc"] == [
            "body", "label"]
        nothing = client.post("/v1/feedback", json={"image": _data_url(blank.getvalue()),
                                                     "label": 1})
        assert nothing.status_code == 400 and "nothing drawn" in nothing.json()["detail"]
        garbage = client.post("/v1/feedback", json={
            "image": "data:image/png;base64," + base64.b64encode(b"not a png").decode(),
            "label": 1})
        assert garbage.status_code == 400 and "decoded" in garbage.json()["detail"]
        assert client.post("/v1/feedback", json={"label": 1}).status_code == 422
        assert client.post("/v1/feedback", json={"pixels": digit, "label": False}
                           ).status_code == 422  # not a digit 0
        oversize = client.post("/v1/feedback", json={
            "image": "data:image/png;base64," + "A" * (1 << 20), "label": 1})
        assert oversize.status_code == 413 and "over" in oversize.json()["detail"]
        assert client.post("/v1/feedback", json={"pixels": digit, "label": 1}).status_code == 201


def test_a_client_posting_too_fast_is_told_to_wait(feedback_app, mnist_tables):
    test = mnist_tables[Split.TEST]
    with feedback_app(feedback_rate="3/minute") as client:
        codes = [client.post("/v1/feedback", json={
            "pixels": [int(v) for v in test.pixels[i]], "label": int(test.labels[i])}
        ).status_code for i in range(5)]
        assert codes == [201, 201, 201, 429, 429]
        limited = client.post("/v1/feedback", json={
            "pixels": [int(v) for v in test.pixels[9]], "label": 1})
        assert limited.status_code == 429 and 0 < int(limited.headers["Retry-After"]) <= 60
        # scoring is not rate limited
        assert client.post("/v1/predict", json={
            "pixels": [int(v) for v in test.pixels[0]]}).status_code == 200


def test_feedback_off_answers_404(bundle_root, mnist_tables):
    with TestClient(create_app(str(bundle_root / "bundles"), watch_interval_s=0)) as client:
        response = client.post("/v1/feedback", json={
            "pixels": [int(v) for v in mnist_tables[Split.TEST].pixels[0]], "label": 7})
        assert response.status_code == 404 and "off" in response.json()["detail"]


def _serve(tmp_path: Path, bundle_root: Path, env: dict[str, str] | None, *extra: str
           ) -> tuple[object, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_service(
        [str(Path(sys.executable).parent / "mlpaint"), "serve", "--bundle",
         str(bundle_root / "bundles"), "--port", str(port), "--watch-seconds", "0", *extra],
        f"{url}/readyz", env=env, log=tmp_path / f"serve-{port}.log", timeout_s=120)
    return process, url


@pytest.mark.integration
def test_two_workers_posting_at_once_store_everything_once_and_tell_prefect(
        bundle_root, mnist_tables, tmp_path, cli_env, prefect_api):
    store = tmp_path / "shared-feedback"
    process, url = _serve(tmp_path, bundle_root, cli_env, "--workers", "2",
                          "--feedback-store", str(store), "--feedback-rate", "1000/minute")
    test = mnist_tables[Split.TEST]
    # 40 distinct drawings, each posted three times (twice with the same label, once with
    # another) over fresh connections, so both workers take part.
    posts = [{"image": _data_url(_png(np.asarray(test.pixels[i]))), "label": label}
             for i in range(40) for label in (int(test.labels[i]), int(test.labels[i]),
                                              (int(test.labels[i]) + 1) % 10)]
    started = datetime.now(UTC)
    try:
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(
                lambda body: requests.post(f"{url}/v1/feedback", json=body, timeout=30), posts))
        assert {r.status_code for r in responses} <= {200, 201}, [r.text for r in responses]
        created = [r.json()["id"] for r in responses if r.status_code == 201]
        assert len(created) == len(set(created)) == 80
        assert {r.json()["id"] for r in responses} == set(created)

        def all_events() -> list[dict] | None:
            events = prefect_events(prefect_api, "mlpaint.feedback.received", started)
            return events if len(events) >= 80 else None

        events = wait_for(all_events, "80 feedback events", timeout_s=60, interval_s=1)
        assert len(events) == 80  # one per new record, none for a repeat
        assert {e["resource"]["prefect.resource.id"] for e in events} == {
            f"mlpaint.feedback.{record_id}" for record_id in created}
        assert all(set(e["payload"]) == {"label", "answered_digit", "corrected",
                                         "bundle_version"} for e in events)
        # Both workers' stored posts, counted once each; the posts did not say what the
        # app had answered, so their verdict is unknown.
        stored = counted_samples(requests.get(f"{url}/metrics", timeout=10).text,
                                 "mlpaint_feedback_total")
        assert {dict(labels)["verdict"]: value for labels, value in stored.items()} == {
            "unknown": 80.0}
    finally:
        stop_service(process)

    # The review commands read the same store.
    listed = run_cli(["feedback", "list", "--json", "--store", str(store)], cli_env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 80 and {row["id"] for row in rows} == set(created)
    rejected_id = rows[0]["id"]
    rejected = run_cli(["feedback", "reject", rejected_id[:8], "--reason", "not a digit",
                        "--store", str(store)], cli_env)
    assert rejected.returncode == 0 and rejected_id in rejected.stdout
    shown = run_cli(["feedback", "show", rejected_id[:8], "--json", "--store", str(store),
                     "--save-drawing", str(tmp_path / "drawing.png")], cli_env)
    shown_record = json.loads(shown.stdout)
    assert shown_record["rejected"] and shown_record["reject_reason"] == "not a digit"
    assert Image.open(tmp_path / "drawing.png").size == (280, 280)
    export = run_cli(["feedback", "export", str(tmp_path / "feedback-train.csv"), "--store",
                      str(store)], cli_env)
    assert export.returncode == 0 and export.stdout.startswith("79 accepted")
    missing = run_cli(["feedback", "show", "abcdef00", "--store", str(store)], cli_env)
    assert missing.returncode == 1 and "no such record" in missing.stderr
    # Each drawing was labelled two ways: the data check finds the 40 contradictions and
    # nothing else in what the two workers stored.
    checked = run_cli(["feedback", "check", "--json", "--store", str(store)], cli_env)
    assert checked.returncode == 1, checked.stderr
    findings = json.loads(checked.stdout)["findings"]
    assert sorted({f["check"] for f in findings}) == ["conflicting-labels"]
    assert len(findings) == 40 and {f["id"] for f in findings} < set(created)


@pytest.mark.integration
def test_feedback_is_stored_when_prefect_is_down(bundle_root, mnist_tables, tmp_path, cli_env):
    dead_api = f"http://127.0.0.1:{free_port()}/api"
    process, url = _serve(tmp_path, bundle_root, {**cli_env, "PREFECT_API_URL": dead_api},
                          "--workers", "1", "--feedback-store", str(tmp_path / "fb"))
    log = next(tmp_path.glob("serve-*.log"))
    try:
        test = mnist_tables[Split.TEST]
        for i in range(3):
            response = requests.post(f"{url}/v1/feedback", json={
                "pixels": [int(v) for v in test.pixels[i]], "label": int(test.labels[i])},
                timeout=30)
            assert response.status_code == 201, response.text
        assert len(FeedbackStore.at(str(tmp_path / "fb")).ids()) == 3
        # Prefect's events worker gives up after its reconnection attempts and says so.
        wait_for(lambda: "EventsWorker' failed" in log.read_text(),
                 "the events worker to give up", timeout_s=90, interval_s=1)
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    finally:
        stop_service(process)


def _post_feedback(url: str, test, rows, headers=None) -> list[int]:
    """One labelled official test digit per row, each over a fresh connection (so, with
    several workers, the kernel hands them to any of them): the status codes."""
    return [requests.post(f"{url}/v1/feedback", headers=headers or {}, timeout=30, json={
        "pixels": [int(v) for v in test.pixels[row]], "label": int(test.labels[row])}
    ).status_code for row in rows]


@pytest.mark.integration
@pytest.mark.parametrize(("storage", "stored"), [("redis", 5), ("memory://", 10)])
def test_servers_share_one_feedback_rate_limit_through_redis(
        bundle_root, mnist_tables, tmp_path, redis_url, storage, stored):
    """Counted in Debian's redis-server, the limit holds for every process together: of 12
    posts from one address, alternating between two servers on one store, exactly the 5 a
    minute allows are stored. Counted in each process's memory, each allows 5 (so N
    workers allow N times the rate, as `mlpaint serve --help` says)."""
    servers = [_serve(tmp_path, bundle_root, None, "--workers", "1",
                      "--feedback-store", str(tmp_path / "feedback"),
                      "--feedback-rate", "5/minute", "--rate-limit-storage",
                      redis_url if storage == "redis" else storage) for _ in range(2)]
    test = mnist_tables[Split.TEST]
    try:
        codes = [code for row in range(12)
                 for code in _post_feedback(servers[row % 2][1], test, [row])]
    finally:
        for process, _ in servers:
            stop_service(process)
    assert sorted(codes) == [201] * stored + [429] * (12 - stored)
    assert len(FeedbackStore.at(str(tmp_path / "feedback")).ids()) == stored


@pytest.mark.integration
@pytest.mark.parametrize(("trusted", "per_client"), [("127.0.0.1", True), ("10.9.8.7", False)])
def test_behind_a_trusted_proxy_the_limit_counts_each_forwarded_client(
        bundle_root, mnist_tables, tmp_path, trusted, per_client):
    """With the proxy's address in --forwarded-allow-ips, X-Forwarded-For names the client,
    so two people behind one proxy each get the rate; from an untrusted address the header
    is ignored and both count as the proxy."""
    process, url = _serve(tmp_path, bundle_root, None, "--workers", "1",
                          "--feedback-store", str(tmp_path / "feedback"),
                          "--feedback-rate", "2/minute", "--forwarded-allow-ips", trusted)
    test = mnist_tables[Split.TEST]
    try:
        first = _post_feedback(url, test, range(3), {"X-Forwarded-For": "203.0.113.1"})
        second = _post_feedback(url, test, range(3, 5), {"X-Forwarded-For": "203.0.113.2"})
    finally:
        stop_service(process)
    assert first == [201, 201, 429]
    assert second == ([201, 201] if per_client else [429, 429])
