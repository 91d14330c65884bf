"""The REST API against the real app and a real small bundle."""

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mlpaint.data.pins import Split
from mlpaint.serving.app import create_app
from tests.conftest import counted_samples, metric_samples
from tests.integration.conftest import build_and_publish


@pytest.fixture(scope="module")
def client(bundle_root):
    with TestClient(create_app(str(bundle_root / "bundles"), watch_interval_s=0)) as client:
        yield client


def _digits(mnist_tables, count=40):
    test = mnist_tables[Split.TEST]
    return np.asarray(test.pixels[:count]), test.labels[:count]


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _drawn(pixels: np.ndarray) -> str:
    """A test digit as a person would draw it: black ink on white, 10x larger."""
    big = Image.fromarray(pixels.reshape(28, 28)).resize((280, 280), Image.Resampling.BILINEAR)
    return _data_url(Image.fromarray(255 - np.asarray(big)))


def test_health_ready_and_model(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["bundle_version"].endswith("-v1")
    model = client.get("/v1/model").json()
    assert model["model_version"] == "1" and model["feature_stage"] == "moments"
    assert 0.9 < model["metrics"]["test_accuracy"] <= 1 and model["gallery_per_digit"] == 8
    assert model["low_confidence_below"] == 0.6  # a model trained without pen drawings


def test_every_response_carries_the_security_headers(client):
    """The page may load only its own script and styles and call only its own API; nothing
    inline, no frames; no MIME sniffing, no referrer. FastAPI's API documents keep the
    other headers but not the policy: they load their script from a CDN."""
    from mlpaint.serving.security import CONTENT_SECURITY_POLICY

    page = client.get("/")
    assert page.status_code == 200
    assert "<script>" not in page.text and "<style>" not in page.text
    assert 'style="' not in page.text  # the policy would refuse inline style attributes
    for path in ("/", "/static/page.js", "/static/page.css", "/v1/model", "/readyz",
                 "/no-such-page"):
        response = client.get(path)
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-frame-options"] == "DENY"
    policy = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert policy["script-src"] == policy["style-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert client.get("/static/page.js").headers["content-type"].startswith(
        ("text/javascript", "application/javascript"))
    assert client.get("/static/page.css").headers["content-type"].startswith("text/css")
    docs = client.get("/docs")
    assert "content-security-policy" not in docs.headers
    assert docs.headers["x-content-type-options"] == "nosniff"
    served = client.post("/v1/predict", json={"pixels": [0] * 784})
    assert served.headers["x-content-type-options"] == "nosniff"


def test_predict_pixels_and_batch(client, mnist_tables):
    pixels, labels = _digits(mnist_tables)
    single = client.post("/v1/predict", json={"pixels": pixels[0].tolist()}).json()
    (prediction,) = single["predictions"]
    assert prediction["digit"] == labels[0]
    assert abs(sum(prediction["probabilities"]) - 1) < 1e-6
    batch = client.post("/v1/predict", json={"batch": [{"pixels": p.tolist()}
                                                       for p in pixels]}).json()
    digits = [p["digit"] for p in batch["predictions"]]
    assert np.mean(np.array(digits) == labels) > 0.9


def test_drawn_images_score_like_their_pixels(client, mnist_tables):
    pixels, labels = _digits(mnist_tables, 20)
    agree = 0
    for row, label in zip(pixels, labels, strict=True):
        drawn = client.post("/v1/predict", json={"image": _drawn(row)}).json()
        agree += drawn["predictions"][0]["digit"] == label
    assert agree >= 17  # the round trip through a large drawing keeps the digit


def test_explain_adds_up_and_picks_labels(client, mnist_tables):
    pixels, _ = _digits(mnist_tables, 1)
    body = {"pixels": pixels[0].tolist()}
    raw = client.post("/v1/predict", json=body).json()["predictions"][0]["raw_scores"]
    default = client.post("/v1/explain", json=body).json()
    probabilities = default["probabilities"]
    assert [e["label"] for e in default["explanations"]] == list(
        np.argsort(probabilities)[::-1][:3])
    for explanation in default["explanations"]:
        total = explanation["bias"] + sum(explanation["contributions"])
        assert abs(total - raw[explanation["label"]]) < 1e-6
        assert len(explanation["contributions"]) == 784
    assert len(default["image"]) == len(default["features"]) == 784
    everything = client.post("/v1/explain", json={**body, "labels": "all"}).json()
    assert [e["label"] for e in everything["explanations"]] == list(range(10))
    chosen = client.post("/v1/explain", json={**body, "labels": [5, 5, 0]}).json()
    assert [e["label"] for e in chosen["explanations"]] == [5, 0]


def _canvas(draw) -> str:
    """A 280x280 white canvas with what `draw(ImageDraw)` puts on it, as the page sends it."""
    from PIL import ImageDraw

    image = Image.new("RGB", (280, 280), "white")
    draw(ImageDraw.Draw(image))
    return _data_url(image)


BLANK_INPUTS = {
    "blank pixels": {"pixels": [0] * 784},
    "one lit pixel": {"pixels": [0] * 400 + [255] + [0] * 383},
    "a 2x2 dot": {"pixels": [255 if (r in (13, 14) and c in (13, 14)) else 0
                             for r in range(28) for c in range(28)]},
    "a faint smudge": {"pixels": [30 if 8 <= r < 20 and 8 <= c < 20 else 0
                                  for r in range(28) for c in range(28)]},
    "a blank canvas": {"image": _canvas(lambda d: None)},
    "a transparent canvas": {"image": _data_url(Image.new("RGBA", (280, 280), (0, 0, 0, 0)))},
    "a pen tap": {"image": _canvas(lambda d: d.ellipse((130, 130, 148, 148), fill="black"))},
    "a stray speck": {"image": _canvas(lambda d: d.rectangle((20, 250, 23, 253), fill="black"))},
}


@pytest.mark.parametrize("body", BLANK_INPUTS.values(), ids=BLANK_INPUTS.keys())
def test_nothing_drawn_claims_no_digit(client, body):
    (prediction,) = client.post("/v1/predict", json=body).json()["predictions"]
    assert prediction["status"] == "nothing_drawn"
    assert prediction["digit"] is None and prediction["probabilities"] is None
    assert prediction["candidates"] == []
    explained = client.post("/v1/explain", json=body)
    assert explained.status_code == 200
    assert explained.json()["status"] == "nothing_drawn"
    assert explained.json()["digit"] is None and explained.json()["explanations"] == []


def test_metrics_count_requests_answers_and_the_served_bundle(bundle_root, mnist_tables):
    """A new app, so the counts are this test's alone: each answer by endpoint, digit and
    status, each request by route template and status, and the bundle served."""
    pixels, _ = _digits(mnist_tables, 3)
    with TestClient(create_app(str(bundle_root / "bundles"), watch_interval_s=0)) as client:
        batch = [{"pixels": p.tolist()} for p in pixels] + [BLANK_INPUTS["blank pixels"]]
        answered = client.post("/v1/predict", json={"batch": batch}).json()["predictions"]
        explained = client.post("/v1/explain", json={"pixels": pixels[0].tolist()}).json()
        assert client.get("/v1/examples?digit=3").status_code == 200
        assert client.get("/v1/examples?digit=4").status_code == 200
        assert client.get("/v1/examples?digit=11").status_code == 422
        assert client.get("/no/such/page").status_code == 404
        scraped = client.get("/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    expected_answers: dict = {}
    for endpoint, answer in [*(("predict", a) for a in answered), ("explain", explained)]:
        key = (("digit", "none" if answer["digit"] is None else str(answer["digit"])),
               ("endpoint", endpoint), ("status", answer["status"]))
        expected_answers[key] = expected_answers.get(key, 0) + 1
    assert counted_samples(scraped.text, "mlpaint_predictions_total") == expected_answers
    # Every answer a server can give is a series from its start, so Prometheus' increase()
    # sees the first one: 2 endpoints x (10 digits x 2 statuses + nothing drawn).
    assert len(metric_samples(scraped.text, "mlpaint_predictions_total")) == 42
    # ... and so is each answering route's first server error.
    assert metric_samples(scraped.text, "mlpaint_http_requests_total")[
        (("method", "POST"), ("route", "/v1/explain"), ("status", "500"))] == 0.0
    requests_by_route = counted_samples(scraped.text, "mlpaint_http_requests_total")
    assert requests_by_route == {
        (("method", "POST"), ("route", "/v1/predict"), ("status", "200")): 1.0,
        (("method", "POST"), ("route", "/v1/explain"), ("status", "200")): 1.0,
        (("method", "GET"), ("route", "/v1/examples"), ("status", "200")): 2.0,
        (("method", "GET"), ("route", "/v1/examples"), ("status", "422")): 1.0,
        (("method", "GET"), ("route", "unmatched"), ("status", "404")): 1.0}
    info = metric_samples(scraped.text, "mlpaint_model_info")
    assert [(dict(labels)["model_version"], value) for labels, value in info.items()] == [
        ("1", 1.0)]


def test_a_batch_answers_each_drawing_on_its_own(client, mnist_tables):
    pixels, labels = _digits(mnist_tables, 2)
    batch = [{"pixels": pixels[0].tolist()}, BLANK_INPUTS["blank pixels"],
             {"image": _drawn(pixels[1])}, BLANK_INPUTS["a pen tap"]]
    predictions = client.post("/v1/predict", json={"batch": batch}).json()["predictions"]
    assert [p["status"] for p in predictions][1::2] == ["nothing_drawn", "nothing_drawn"]
    for prediction, label in zip(predictions[0::2], labels, strict=True):
        assert prediction["status"] in {"ok", "low_confidence"}
        assert prediction["digit"] == label == prediction["candidates"][0]
        assert len(prediction["candidates"]) == 2


def test_low_confidence_is_marked_with_two_candidates(client, mnist_tables):
    """Half a 4 laid over half a 9 leaves the model torn; whatever it answers, the status
    follows the top probability and the two candidates are the two most probable digits."""
    test = mnist_tables[Split.TEST]
    four = np.asarray(test.pixels[np.flatnonzero(test.labels == 4)[:20]], dtype=np.float32)
    nine = np.asarray(test.pixels[np.flatnonzero(test.labels == 9)[:20]], dtype=np.float32)
    blends = np.rint((four + nine) / 2).astype(np.uint8)
    predictions = client.post("/v1/predict", json={"batch": [{"pixels": b.tolist()}
                                                             for b in blends]}).json()
    statuses = set()
    for prediction in predictions["predictions"]:
        top = max(prediction["probabilities"])
        statuses.add(prediction["status"])
        assert prediction["status"] == ("low_confidence" if top < 0.6 else "ok")
        order = np.argsort(prediction["probabilities"])[::-1][:2].tolist()
        assert prediction["candidates"] == order
    assert "low_confidence" in statuses


def test_the_served_models_own_threshold_marks_low_confidence(small_model, mnist_tables,
                                                              tmp_path):
    """A model whose card says 0.97 (as training chooses one per model) is "not sure" below
    0.97, in /v1/predict and /v1/explain alike, and says so on /v1/model."""
    from mlpaint.training.algorithms import DigitModel

    strict = DigitModel(small_model.boosters, algorithm=small_model.algorithm,
                        rounds=small_model.rounds, feature_stage=small_model.feature_stage,
                        low_confidence_below=0.97)
    build_and_publish(strict, mnist_tables, tmp_path, "1", rows=200)
    pixels, _ = _digits(mnist_tables, 200)
    with TestClient(create_app(str(tmp_path / "bundles"), watch_interval_s=0)) as client:
        assert client.get("/v1/model").json()["low_confidence_below"] == 0.97
        predictions = client.post("/v1/predict", json={"batch": [
            {"pixels": p.tolist()} for p in pixels]}).json()["predictions"]
        tops = [max(p["probabilities"]) for p in predictions]
        assert [p["status"] for p in predictions] == [
            "low_confidence" if top < 0.97 else "ok" for top in tops]
        assert any(0.6 <= top < 0.97 for top in tops)  # marked here, not by the default
        unsure = next(i for i, top in enumerate(tops) if 0.6 <= top < 0.97)
        explained = client.post("/v1/explain", json={"pixels": pixels[unsure].tolist()})
        assert explained.json()["status"] == "low_confidence"


def test_examples(client):
    example = client.get("/v1/examples", params={"digit": 3, "offset": 2}).json()
    assert example["digit"] == 3 and example["count"] == 8 and example["offset"] == 2
    assert len(example["contributions"]) == 10 and len(example["contributions"][0]) == 784
    for cls in range(10):
        total = example["bias"][cls] + sum(example["contributions"][cls])
        assert abs(total - example["raw_scores"][cls]) < 1e-4
    past = client.get("/v1/examples", params={"digit": 3, "offset": 8})
    assert past.status_code == 404 and "offsets 0..7" in past.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"pixels": [0] * 783}, 422, "784"),
        ({"pixels": [0] * 783 + [256]}, 422, "less than or equal to 255"),
        ({"pixels": [0] * 783 + [-1]}, 422, "greater than or equal to 0"),
        ({"pixels": [0] * 784, "image": "data:image/png;base64,AA=="}, 422, "exactly one"),
        ({}, 422, "exactly one"),
        ({"image": "data:image/png;base64,bm90IGFuIGltYWdl"}, 400, "could not be decoded"),
        # The data-URL rule is the schema's: refused as schema-invalid, naming the pattern.
        ({"image": "data:image/png;base64,@@@"}, 422, "should match pattern"),
        ({"image": "http://example.org/x.png"}, 422, "should match pattern"),
        ({"image": ""}, 422, "should match pattern"),
        ({"batch": [{"image": ""}]}, 422, "should match pattern"),
        ({"pixels": [0] * 784, "colour": 1}, 422, "Extra inputs"),
    ],
)
def test_bad_predict_inputs(client, body, status, fragment):
    response = client.post("/v1/predict", json=body)
    assert response.status_code == status
    assert fragment in json.dumps(response.json())


def test_nan_unknown_label_and_oversized_body(client):
    text = '{"pixels": [' + ",".join(["0"] * 783 + ["NaN"]) + "]}"
    nan = client.post("/v1/predict", content=text, headers={"Content-Type": "application/json"})
    assert nan.status_code == 422
    label = client.post("/v1/explain", json={"pixels": [0] * 784, "labels": [11]})
    assert label.status_code == 422 and "less than or equal to 9" in label.text
    huge = client.post("/v1/predict", content=b"{" + b" " * (1 << 20) + b"}",
                       headers={"Content-Type": "application/json"})
    assert huge.status_code == 413

    def chunked(payload: bytes, size: int = 64 * 1024):  # no Content-Length: sent in chunks
        yield from (payload[i:i + size] for i in range(0, len(payload), size))

    too_long = b'{"pixels": [' + b"0," * (1 << 19) + b"0]}"
    assert client.post("/v1/predict", content=chunked(too_long),
                       headers={"Content-Type": "application/json"}).status_code == 413
    fits = json.dumps({"pixels": [0] * 784}).encode()
    response = client.post("/v1/predict", content=chunked(fits, 500),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert client.get("/v1/examples", params={"digit": 10}).status_code == 422


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(body=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=8) | st.dictionaries(
        st.sampled_from(["pixels", "image", "batch", "labels", "x"]), children, max_size=4),
    max_leaves=20))
def test_fuzzed_bodies_never_5xx(client, body):
    for path in ("/v1/predict", "/v1/explain"):
        response = client.post(path, content=json.dumps(body, allow_nan=True),
                               headers={"Content-Type": "application/json"})
        assert response.status_code < 500, (path, body, response.text)


def test_newer_bundle_is_swapped_in_whole(small_model, mnist_tables, tmp_path):
    root = tmp_path
    build_and_publish(small_model, mnist_tables, root, "1", rows=300)
    app = create_app(str(root / "bundles"), watch_interval_s=0)
    with TestClient(app) as client:
        holder = app.state.serving.holder
        assert client.get("/v1/model").json()["model_version"] == "1"
        # uploaded but not promoted: LATEST still names v1, nothing changes
        build_and_publish(small_model, mnist_tables, root, "2", promote=False, rows=300)
        assert holder.refresh() is False
        assert client.get("/v1/model").json()["model_version"] == "1"
        build_and_publish(small_model, mnist_tables, root, "3", rows=300)
        assert holder.refresh() is True
        assert client.get("/v1/model").json()["model_version"] == "3"
        # a LATEST naming a broken bundle: keep serving, report it
        (root / "bundles" / "LATEST").write_text("20260109T000000Z-v9\n")
        assert holder.refresh() is False
        assert client.get("/v1/model").json()["model_version"] == "3"
        assert "no manifest.json" in client.get("/readyz").json()["last_refresh_error"]
        scraped = client.get("/metrics").text
    assert metric_samples(scraped, "mlpaint_model_reloads_total") == {
        (("outcome", "failed"),): 1.0, (("outcome", "swapped"),): 1.0}
    served = metric_samples(scraped, "mlpaint_model_info")
    assert sorted((dict(labels)["model_version"], value) for labels, value in served.items()) \
        == [("1", 0.0), ("3", 1.0)]


def test_a_server_following_the_destination_swaps_back_on_a_rollback(small_model, mnist_tables,
                                                                     tmp_path):
    """A rollback moves LATEST only: the server swaps to the kept bundle on its next look,
    nothing is built or uploaded, and the history records both moves and the rollback."""
    from mlpaint.publishing.bundle import latest_history
    from mlpaint.publishing.rollback import RollbackError, rollback
    from mlpaint.storage.stores import store_for

    first = build_and_publish(small_model, mnist_tables, tmp_path, "1", rows=300)
    second = build_and_publish(small_model, mnist_tables, tmp_path, "2", rows=300)
    destination = str(tmp_path / "bundles")
    app = create_app(destination, watch_interval_s=0)
    with TestClient(app) as client:
        assert client.get("/v1/model").json()["model_version"] == "2"
        kept = sorted(p.name for p in (tmp_path / "bundles" / "versions").iterdir())
        result = rollback(destination, bundle_version=None, reason="bad promotion",
                          by="test")
        assert (result.entry.bundle_version, result.entry.previous) == (first, second)
        assert result.champion_alias is None  # no registry given
        assert app.state.serving.holder.refresh() is True
        assert client.get("/v1/model").json()["model_version"] == "1"
    assert sorted(p.name for p in (tmp_path / "bundles" / "versions").iterdir()) == kept
    moves = [(e.action, e.bundle_version, e.previous, e.reason)
             for e in latest_history(store_for(destination))]
    assert moves[-1] == ("rollback", first, second, "bad promotion")
    assert [m[:3] for m in moves[:2]] == [("publish", first, None), ("publish", second, first)]
    # A destination whose history is gone (or predates it) needs the bundle named.
    (tmp_path / "bundles" / "history").rename(tmp_path / "history-elsewhere")
    with pytest.raises(RollbackError, match=r"no bundle before \S+ is recorded"):
        rollback(destination, bundle_version=None, reason="", by="test")


def test_the_grafana_dashboard_queries_what_the_server_exports(small_model, mnist_tables,
                                                                tmp_path):
    """Every metric and label the shipped dashboard's queries name is one the server
    exports, after traffic of every kind (answers, feedback, a reload)."""
    import re

    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import REPO

    build_and_publish(small_model, mnist_tables, tmp_path, "1", rows=300)
    pixels, labels = _digits(mnist_tables, 1)
    app = create_app(str(tmp_path / "bundles"), watch_interval_s=0,
                     feedback_store=str(tmp_path / "feedback"))
    with TestClient(app) as client:
        body = {"pixels": pixels[0].tolist()}
        answer = client.post("/v1/predict", json=body).json()["predictions"][0]
        assert client.post("/v1/explain", json=body).status_code == 200
        posted = client.post("/v1/feedback", json={**body, "label": int(labels[0]),
                                                    "digit": answer["digit"]})
        assert posted.status_code == 201, posted.text
        build_and_publish(small_model, mnist_tables, tmp_path, "2", rows=300)
        assert app.state.serving.holder.refresh() is True
        scraped = client.get("/metrics").text
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(scraped):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    dashboard = json.loads((REPO / "infra/grafana/mlpaint-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(queries) == len(dashboard["panels"]) >= 8
    for query in queries:
        named = re.findall(r"\bmlpaint_[a-z_]+", query)
        assert named and set(named) <= exported.keys(), (query, sorted(exported))
        used = set(re.findall(r"\b([a-z_]+)\s*(?:=~|!=|=)\s*\"", query))
        for grouping in re.findall(r"by \(([^)]*)\)", query):
            used |= {label.strip() for label in grouping.split(",")} - {"le"}
        offered = set().union(*(exported[name] for name in named))
        assert used <= offered, (query, used - offered)


def test_what_startup_loaded_is_out_of_the_collectors_reach(bundle_root):
    """Full garbage collections under load rescanned everything startup left alive (the
    libraries, the model): pauses of hundreds of milliseconds that every waiting request paid
    (BENCHMARKS.md, serving the champion). Once started, the app has exempted those objects,
    so a collection scans only what requests make."""
    import gc

    gc.unfreeze()
    try:
        with TestClient(create_app(str(bundle_root / "bundles"), watch_interval_s=0)):
            frozen = gc.get_freeze_count()
            assert frozen > 50_000
            assert len(gc.get_objects()) < frozen / 10
    finally:
        gc.unfreeze()
