"""End to end on real services: `infra/stack.sh up` starts `prefect server start`, the process
work pool and a worker, and `mlflow server`; `prefect deploy` registers prefect.yaml. A run is
created from the Prefect UI's run form in a browser, the worker completes it, and the MLflow
server's REST API shows the run and the registered model."""

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import requests

from flows.steps import experiment_spec
from mlpaint.data.pins import Split
from mlpaint.feedback.monitoring import MONITOR_EXPERIMENT
from mlpaint.feedback.traffic import live_traffic
from mlpaint.processes import free_port, start_service, stop_service
from mlpaint.training.spec import ExperimentSpec, load_spec
from tests.conftest import REPO, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.stack]

TINY_ALGORITHMS = """
lgbm:
  kind: gbdt
  rounds: 10
  params: {learning_rate: 0.3, num_leaves: 15, min_data_in_leaf: 10, max_bin: 31}
champion:
  kind: gbdt
  rounds: 40
  params: {learning_rate: 0.3, num_leaves: 15, min_data_in_leaf: 10, max_bin: 31}
"""


@pytest.fixture(scope="module")
def stack():
    # Not under pytest's temporary folder: that is private to its owner, and the stack's
    # PostgreSQL runs as the `postgres` user, who must reach its data folder.
    state = Path(tempfile.mkdtemp(prefix="mlpaint-stack-"))
    state.chmod(0o711)
    # Runs silent for 60 s count as crashed (the stack's default is 90 s): beats come every
    # 30 s, so a live run is never mistaken for a dead one, and the fault test waits less.
    # Prometheus scrapes, every second, the port the Prometheus test serves on.
    env = {**os.environ, "MLPAINT_STACK_DIR": str(state), "PREFECT_PORT": str(free_port()),
           "MLFLOW_PORT": str(free_port()), "PG_PORT": str(free_port()),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "MLPAINT_CACHE_DIR": str(state / "cache"),
           "MLPAINT_ZOMBIE_SECONDS": "60", "PROMETHEUS_PORT": str(free_port()),
           "MLPAINT_METRICS_TARGETS": f"127.0.0.1:{free_port()}",
           "PROMETHEUS_SCRAPE_SECONDS": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    script = str(REPO / "infra" / "stack.sh")
    up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        yield {"prefect": f"http://127.0.0.1:{env['PREFECT_PORT']}/api",
               "mlflow": f"http://127.0.0.1:{env['MLFLOW_PORT']}", "state": state,
               "postgres_port": env["PG_PORT"], "env": env,
               "prometheus": f"http://127.0.0.1:{env['PROMETHEUS_PORT']}",
               "scraped": env["MLPAINT_METRICS_TARGETS"]}
    finally:
        down = subprocess.run([script, "down"], env=env, capture_output=True, text=True,
                              timeout=120)
        for name in ("prefect-server", "mlflow-server", "prefect-worker", "prometheus"):
            assert not (state / f"{name}.pid").exists()
        assert "postgres stopped" in down.stderr
        shutil.rmtree(state, ignore_errors=True)


def _postgres_count(stack: dict, database: str, sql: str) -> int:
    """A count from the stack's PostgreSQL, through its own client."""
    psql = sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))[-1]
    done = subprocess.run([str(psql), "-h", "127.0.0.1", "-p", stack["postgres_port"], "-U",
                           "mlpaint", "-d", database, "-tAc", sql], capture_output=True,
                          text=True, check=True, timeout=30)
    return int(done.stdout.strip())


@contextlib.contextmanager
def _prefect_client(api_url):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), \
            get_client(sync_client=True) as client:
        yield client


def _wait_until_final(client, flow_run_id, timeout_s: float = 420,
                      passing: frozenset[str] | set[str] = frozenset()):
    """The flow run's first final state, not counting the state types in `passing`."""

    def final():
        state = client.read_flow_run(flow_run_id).state
        return state if state.is_final() and state.type.value not in passing else None

    return wait_for(final, f"flow run {flow_run_id} to end", timeout_s=timeout_s,
                    interval_s=2)


@pytest.fixture
def served_bundles(tmp_path):
    """A folder of bundles, and a function that starts `mlpaint serve` following it."""
    bundles = tmp_path / "bundles"
    started = []

    def serve() -> str:
        port = free_port()
        mlpaint = str(Path(sys.executable).parent / "mlpaint")
        started.append(start_service(
            [mlpaint, "serve", "--bundle", str(bundles), "--port", str(port),
             "--watch-seconds", "1", "--workers", "1"], f"http://127.0.0.1:{port}/readyz",
            log=tmp_path / "serve.log", timeout_s=120))
        return f"http://127.0.0.1:{port}"

    yield bundles, serve
    for process in started:
        stop_service(process)


def _wait_for_bundle(server: str, version: str, timeout_s: float = 60) -> dict:
    def serving() -> dict | None:
        ready = requests.get(f"{server}/readyz", timeout=5).json()
        return ready if ready.get("bundle_version") == version else None

    return wait_for(serving, f"{server} to serve bundle {version}", timeout_s=timeout_s,
                    interval_s=1)


def _prometheus_query(prometheus: str, query: str) -> list[dict]:
    response = requests.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=10)
    response.raise_for_status()
    return response.json()["data"]["result"]


def test_prometheus_scrapes_the_server_and_counts_the_traffic_sent(stack, bundle_root,
                                                                   mnist_tables, shared_mnist,
                                                                   tmp_path):
    """The stack's Prometheus scrapes `mlpaint serve` where MLPAINT_METRICS_TARGETS says it
    listens: after 12 predictions and 5 explanations over two workers, a query over the
    predictions counter returns exactly that traffic, by endpoint and digit, and the
    monitor's Prometheus figures (`live_traffic`) count it too, as does the monitor
    deployment's run."""
    port = int(stack["scraped"].rsplit(":", 1)[1])
    mlpaint = str(Path(sys.executable).parent / "mlpaint")
    server = start_service(
        [mlpaint, "serve", "--bundle", str(bundle_root / "bundles"), "--port", str(port),
         "--workers", "2", "--watch-seconds", "0"], f"http://127.0.0.1:{port}/readyz",
        log=tmp_path / "serve.log", timeout_s=120)
    try:
        # Prometheus has seen every answer series at 0 before the first answer.
        wait_for(lambda: _prometheus_query(stack["prometheus"],
                                           "count(mlpaint_predictions_total == 0)"),
                 "Prometheus to scrape the new server", timeout_s=60, interval_s=1)
        test = mnist_tables[Split.TEST]
        pixels = [np.asarray(test.pixels[i]).tolist() for i in range(17)]
        for i in range(12):
            response = requests.post(f"http://127.0.0.1:{port}/v1/predict",
                                     json={"pixels": pixels[i]}, timeout=30)
            assert response.status_code == 200, response.text
        digits = collections.Counter(str(requests.post(
            f"http://127.0.0.1:{port}/v1/explain", json={"pixels": pixels[i]},
            timeout=30).json()["digit"]) for i in range(12, 17))

        def counted() -> list[dict] | None:
            result = _prometheus_query(stack["prometheus"],
                                       "sum by (endpoint) (mlpaint_predictions_total)")
            totals = {r["metric"]["endpoint"]: float(r["value"][1]) for r in result}
            return result if totals == {"predict": 12.0, "explain": 5.0} else None

        wait_for(counted, "Prometheus to scrape the 17 answers", timeout_s=60, interval_s=1)
        up = _prometheus_query(stack["prometheus"], 'up{job="mlpaint"}')
        assert [(r["metric"]["instance"], r["value"][1]) for r in up] == [
            (stack["scraped"], "1")]
        explained = _prometheus_query(
            stack["prometheus"], 'sum by (digit) (mlpaint_predictions_total{endpoint="explain"})')
        assert {r["metric"]["digit"]: int(float(r["value"][1])) for r in explained
                if float(r["value"][1])} == digits

        # The monitor's view of the same traffic. Its window counts are increase()
        # estimates: every series started at 0, so no answer is lost, but the count is
        # extrapolated from the last scrape to the query's time, which here, seconds after
        # the server started, can add up to one scrape interval's share of the series' life
        # (at most about twice the count; over a day's window, under a percent). Shares are
        # exact: every series of one server is scraped at the same times.
        traffic = live_traffic(stack["prometheus"], "10m")
        assert 17 <= traffic.answers <= 17 * 2.2, traffic
        assert traffic.answer_share("nothing_drawn") == 0.0
        assert traffic.answer_share("ok") + traffic.answer_share("low_confidence") == \
            pytest.approx(1.0)
        assert traffic.judged_share == 0.0 and traffic.failed_reloads == 0.0
        served = requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=5).json()
        assert traffic.serving == [(served["bundle_version"], served["model_version"])]
        assert 0 < traffic.predict_p99_seconds < 5, traffic
        assert traffic.server_error_share == 0.0

        # The monitor deployment, run by the stack's worker, asks the stack's Prometheus
        # (MLPAINT_PROMETHEUS_URL, which the stack sets) and records what it counted.
        with _prefect_client(stack["prefect"]) as client:
            flow_run = client.create_flow_run_from_deployment(
                client.read_deployment_by_name("monitor-mlpaint/monitor-hourly").id,
                parameters={"spec": {"sources": [str(shared_mnist)],
                                     "feedback_store": str(tmp_path / "feedback"),
                                     "bundle": str(bundle_root / "bundles"),
                                     "reference_rows": 500, "prometheus_window": "10m"}})
            state = _wait_until_final(client, flow_run.id, timeout_s=240)
            assert state.is_completed(), f"{state.type}: {state.message}"
    finally:
        stop_service(server)
    [monitored] = [run for run in _mlflow_runs(stack, MONITOR_EXPERIMENT)
                   if run["data"].get("metrics")]
    metrics = {m["key"]: m["value"] for m in monitored["data"]["metrics"]}
    assert 17 <= metrics["prometheus_answers"] <= 17 * 2.2, metrics
    assert metrics["prometheus_judged_share"] == 0.0 and "prometheus_predict_p99_seconds" in metrics


def _form_field(page, label: str):
    """The input of the run form's field labelled `label`, in either of Prefect's UIs. The old
    UI's labels point at no element, so there it is the input inside the field's own box."""
    found = page.locator("label", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")).first
    found.wait_for(timeout=60_000)
    named = page.locator(f"[id='{found.get_attribute('for')}']")
    if named.count():
        return named
    return found.locator("xpath=ancestor::div[contains(@class,'schema-form-property')][1]"
                         ).locator("input, textarea").first


def _submit_run_form(browser, api_url: str, deployment_id, ui: str, edits: dict[str, str],
                     send: bool = False) -> tuple[dict, str | None]:
    """Open a deployment's "Run > Custom run" form in the Prefect UI (`ui`: "" the old one,
    "/v2" the new, Prefect's default), type `edits` ({field label: text}), press Submit, and
    return the parameters the form sent, as the server reads them (the old UI sends a JSON
    field as text to be parsed), and the new flow run's id. With `send` False the browser
    stops the request: no run is made."""
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.route("**/create_flow_run",
               lambda route: route.continue_() if send else route.abort())
    try:
        page.goto(f"{api_url.removesuffix('/api')}{ui}/deployments/deployment/"
                  f"{deployment_id}/run")
        for label, text in edits.items():
            _form_field(page, label).fill(text)
        with page.expect_request("**/create_flow_run", timeout=60_000) as request:
            page.get_by_role("button", name="Submit").click()
        body = json.loads(request.value.post_data)
        created = request.value.response().json()["id"] if send else None
    finally:
        page.close()
    return hydrate(body["parameters"], HydrationContext(raise_on_error=True)), created


def test_the_run_forms_send_the_deployments_whole_spec_with_the_edits(stack, browser):
    """Prefect's run forms submit every field, filling what a deployment does not give from
    the schema's defaults: the weekly deployment stores the whole champion spec (its build
    step), so its form, left alone, trains the champion, and with a field edited, the
    champion with that edit. No run is made: the browser stops each request."""
    weekly_spec = load_spec("champion", changes={"feedback": {"store": ".mlpaint/feedback"}})
    with _prefect_client(stack["prefect"]) as client:
        weekly = client.read_deployment_by_name("train-mnist/train-weekly")
    assert ExperimentSpec.model_validate(weekly.parameters["spec"]) == weekly_spec
    for ui in ("", "/v2"):
        sent, _ = _submit_run_form(browser, stack["prefect"], weekly.id, ui, {})
        assert ExperimentSpec.model_validate(sent["spec"]) == weekly_spec, ui
        assert sent["publish_to"] == ".mlpaint/bundles", ui
        sent, _ = _submit_run_form(browser, stack["prefect"], weekly.id, ui, {
            "Seed (Optional)": "7", "Experiment (Optional)": "edited-in-the-form"})
        assert ExperimentSpec.model_validate(sent["spec"]) == weekly_spec.model_copy(
            update={"seed": 7, "experiment": "edited-in-the-form"}), ui


def test_a_run_from_the_ui_form_is_completed_by_the_worker(stack, shared_mnist, tmp_path,
                                                            served_bundles, browser):
    algorithms = tmp_path / "algorithms.yaml"
    algorithms.write_text(TINY_ALGORITHMS)
    bundles, serve = served_bundles
    with _prefect_client(stack["prefect"]) as client:
        deployment = client.read_deployment_by_name("train-mnist/train")
        # The run form renders the spec as one typed object: ExperimentSpec's fields.
        form = deployment.parameter_openapi_schema
        spec_schema = form["definitions"]["ExperimentSpec"]["properties"]
        assert {"algorithm", "features", "folds", "augment", "feedback", "pen"} <= set(spec_schema)
        assert "spec" in form["properties"] and "limit" not in form["properties"]
        assert ExperimentSpec.model_validate(deployment.parameters["spec"]) == \
            load_spec("default")
        # A deployment of the default spec on small data, as its build step would store it
        # (sources, size, folds, augmentation), the form's Seed edited before Submit: the
        # run trains the deployment's spec with that edit.
        from prefect.client.schemas.actions import DeploymentUpdate

        client.update_deployment(deployment.id, DeploymentUpdate(parameters={
            "spec": experiment_spec("default", {
                "sources": [str(shared_mnist)], "limit": 1200, "experiment": "e2e",
                "folds": {"kind": "kfold", "k": 2},
                "augment": {"copies": 1, "stroke": {"probability": 0.25}}})["spec"],
            "algorithms_path": str(algorithms), "publish_to": str(bundles)}))
        try:
            _, flow_run_id = _submit_run_form(browser, stack["prefect"], deployment.id, "/v2",
                                              {"Seed (Optional)": "5"}, send=True)
        finally:
            client.update_deployment(deployment.id,
                                     DeploymentUpdate(parameters=deployment.parameters))
        flow_run = client.read_flow_run(flow_run_id)
        state = _wait_until_final(client, flow_run.id)
        assert state.is_completed(), f"flow run ended {state.type}: {state.message}"
        first = (bundles / "LATEST").read_text().strip()
        server = serve()  # serving the UI-style run's model, following the folder
        assert _wait_for_bundle(server, first)["bundle_version"] == first

        weekly = client.read_deployment_by_name("train-mnist/train-weekly")
        assert weekly.schedules and weekly.schedules[0].schedule.cron == "0 3 * * 1"
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        upcoming = wait_for(lambda: client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[weekly.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))),
            "the weekly schedule's upcoming runs", timeout_s=90, interval_s=2)
        assert all(run.expected_start_time.weekday() == 0 for run in upcoming)  # Mondays

        # The run the schedule created, brought forward to now (and made small: the champion
        # spec on 3,000 rows, its algorithm a tiny stand-in, still better than the first
        # model): the worker runs it, the gate promotes it, and the running server swaps.
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        from prefect.states import Scheduled

        scheduled = min(upcoming, key=lambda run: run.expected_start_time)
        client.update_flow_run(scheduled.id, parameters={
            **scheduled.parameters, "algorithms_path": str(algorithms),
            "publish_to": str(bundles),
            "spec": {**scheduled.parameters["spec"], "sources": [str(shared_mnist)],
                     "limit": 3000, "experiment": "e2e-scheduled",
                     "feedback": {"store": str(tmp_path / "no-feedback")}}})
        client.set_flow_run_state(scheduled.id, Scheduled(scheduled_time=datetime.now(UTC)),
                                  force=True)
        scheduled_state = _wait_until_final(client, scheduled.id)
        assert scheduled_state.is_completed(), scheduled_state.message
        weekly_bundle = (bundles / "LATEST").read_text().strip()
        assert weekly_bundle != first
        assert _wait_for_bundle(server, weekly_bundle)["bundle_version"] == weekly_bundle
        served = requests.get(f"{server}/v1/model", timeout=5).json()
        assert served["algorithm"] == "champion"

        summaries = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["mnist-training-summary"])))
        assert {flow_run.id, scheduled.id} <= {a.flow_run_id for a in summaries}
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["mnist-confusion-matrix"])))
        assert flow_run.id in {a.flow_run_id for a in tables}
        links = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["mlflow-run"])))
        # A link artifact's data is the markdown link: "[text](url)".
        mlflow_links = {a.flow_run_id: a.data.rsplit("(", 1)[1].rstrip(")") for a in links}

    mlflow = stack["mlflow"]
    experiment = requests.get(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name",
                              params={"experiment_name": "e2e"}, timeout=10).json()
    runs = requests.post(f"{mlflow}/api/2.0/mlflow/runs/search", timeout=10, json={
        "experiment_ids": [experiment["experiment"]["experiment_id"]]}).json()["runs"]
    names = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "mlflow.runName")
                   for r in runs)
    assert names == ["fold-0", "fold-1", "lgbm-moments"]
    parent = next(r for r in runs if not any(t["key"] == "mlflow.parentRunId"
                                             for t in r["data"]["tags"]))
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert 0.7 < metrics["test_accuracy"] <= 1.0
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert tags["prefect.flow_run_id"] == str(flow_run.id)
    # Exactly the spec the form showed trained: the deployment's, with the Seed edited there.
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert (params["limit"], params["folds.k"], params["seed"]) == ("1200", "2", "5")
    assert params["augment.stroke.probability"] == "0.25"
    assert params["augment.stroke.max_strength"] == "1.0"  # not edited: the file's
    # Each links the other: the MLflow run to the flow run's page, the flow run to the
    # MLflow run's page on the tracking server.
    assert tags["prefect.flow_run_url"].endswith(f"/flow-run/{flow_run.id}")
    assert mlflow_links[flow_run.id].endswith(f"/runs/{parent['info']['run_id']}")
    assert mlflow_links[flow_run.id].startswith(mlflow)
    versions = requests.get(f"{mlflow}/api/2.0/mlflow/model-versions/search",
                            params={"filter": "name='mnist-digits'"},
                            timeout=10).json()["model_versions"]
    assert any(v["run_id"] == parent["info"]["run_id"] for v in versions)
    assert len(versions) == 2  # the UI-style run's and the scheduled run's final models
    # Both servers keep their state in the stack's PostgreSQL, not in SQLite files.
    assert _postgres_count(stack, "prefect", "SELECT count(*) FROM flow_run") >= 2
    assert _postgres_count(stack, "mlflow", "SELECT count(*) FROM model_versions") == 2
    assert not list(stack["state"].rglob("*.db"))
    scheduled_experiment = requests.get(
        f"{mlflow}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": "e2e-scheduled"}, timeout=10).json()
    assert scheduled_experiment["experiment"]["name"] == "e2e-scheduled"


FEEDBACK_ALGORITHMS = """
champion:
  kind: gbdt
  rounds: 40
  params: {learning_rate: 0.3, num_leaves: 15, min_data_in_leaf: 10, max_bin: 31}
weak:
  kind: gbdt
  rounds: 1
  params: {learning_rate: 0.1, num_leaves: 2, min_data_in_leaf: 10, max_bin: 31}
"""


def _drawn_test_digits(mnist: Path, rows: range) -> tuple[list[str], np.ndarray]:
    """Official test digits drawn as on the page: black ink on a white 280x280 canvas, as
    PNG data URLs, and their labels."""
    import base64
    import gzip
    import io

    from PIL import Image

    with gzip.open(mnist / "t10k-images-idx3-ubyte.gz") as handle:
        pixels = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(mnist / "t10k-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8)
    drawings = []
    for row in rows:
        big = Image.fromarray(255 - pixels[row]).resize((280, 280), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        big.save(buffer, format="PNG")
        drawings.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return drawings, labels[rows.start:rows.stop]


def _read(server: str, drawings: list[str]) -> list[int]:
    digits = []
    for start in range(0, len(drawings), 20):  # 20 drawings stay well under the 1 MiB limit
        response = requests.post(f"{server}/v1/predict", timeout=30, json={
            "batch": [{"image": d} for d in drawings[start:start + 20]]})
        assert response.status_code == 200, response.text
        digits += [p["digit"] for p in response.json()["predictions"]]
    return digits


def test_feedback_from_the_page_triggers_a_retraining_that_reaches_the_server(
        stack, shared_mnist, tmp_path):
    """The loop closed on real services: people label 100 drawings through a running
    `mlpaint serve`; each stored record is an event on the Prefect server; the
    train-on-feedback deployment's trigger starts a run after 100 of them; the worker
    continues the serving champion's boosting on MNIST plus the feedback (a warm start: no
    folds), the gate weighs the wild set, and the server swaps."""

    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    algorithms = tmp_path / "algorithms.yaml"
    algorithms.write_text(FEEDBACK_ALGORITHMS)
    bundles, feedback = tmp_path / "bundles", tmp_path / "feedback"
    sources = [str(shared_mnist)]
    with _prefect_client(stack["prefect"]) as client:
        # A deliberately weak model, forced to champion (the registry is shared with the
        # tests before this one), for the server to start from: one stump per digit on raw
        # pixels (the `moments` stage makes even two rounds of 4-leaf trees read 86%).
        weak = client.create_flow_run_from_deployment(
            client.read_deployment_by_name("train-mnist/train").id,
            parameters={"algorithms_path": str(algorithms), "spec": {
                "sources": sources, "algorithm": "weak", "features": "raw", "limit": 1200,
                "folds": {"kind": "kfold", "k": 2}, "experiment": "e2e-weak"}})
        assert _wait_until_final(client, weak.id).is_completed()
        forced = client.create_flow_run_from_deployment(
            client.read_deployment_by_name("publish-mnist-model/publish").id,
            parameters={"spec": {"to": str(bundles), "force": True,
                                 "sources": [str(shared_mnist)], "gallery_per_digit": 5}})
        assert _wait_until_final(client, forced.id).is_completed()
        triggered = client.read_deployment_by_name("train-mnist/train-on-feedback")
        assert triggered.parameters["spec"]["feedback"]["store"] == ".mlpaint/feedback"
        assert triggered.parameters["spec"]["algorithm"] == "champion"
        assert triggered.parameters["spec"]["warm_start"]["alias"] == "champion"
        # The champion spec on small data, on the stumps' raw pixels so it can continue them.
        client.update_deployment(triggered.id, DeploymentUpdate(parameters={
            **triggered.parameters, "algorithms_path": str(algorithms),
            "publish_to": str(bundles),
            "spec": {**triggered.parameters["spec"], "sources": sources, "limit": 3000,
                     "features": "raw", "augment": {**triggered.parameters["spec"]["augment"],
                                                    "copies": 1},
                     "experiment": "e2e-feedback", "feedback": {"store": str(feedback)}}}))

        port = free_port()
        server = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PREFECT_API_URL": stack["prefect"]}
        process = start_service(
            [str(Path(sys.executable).parent / "mlpaint"), "serve", "--bundle", str(bundles),
             "--port", str(port), "--watch-seconds", "1", "--workers", "1",
             "--feedback-store", str(feedback), "--feedback-rate", "1000/minute"],
            f"{server}/readyz", env=env, log=tmp_path / "serve.log", timeout_s=120)
        try:
            weak_bundle = requests.get(f"{server}/readyz", timeout=5).json()["bundle_version"]
            drawings, labels = _drawn_test_digits(shared_mnist, range(5000, 5100))
            weak_read = _read(server, drawings)
            for drawing, label, answer in zip(drawings, labels, weak_read, strict=True):
                response = requests.post(f"{server}/v1/feedback", timeout=10, json={
                    "image": drawing, "label": int(label), "digit": answer})
                assert response.status_code == 201, response.text

            runs = wait_for(lambda: client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[triggered.id]))),
                "the run 100 feedback events trigger", timeout_s=120, interval_s=2)
            assert len(runs) == 1, "100 feedback events did not trigger one run"
            state = _wait_until_final(client, runs[0].id)
            assert state.is_completed(), f"{state.type}: {state.message}"
            new_bundle = (bundles / "LATEST").read_text().strip()
            assert new_bundle != weak_bundle
            assert _wait_for_bundle(server, new_bundle)["bundle_version"] == new_bundle
            # The drawings people corrected are now read as their labels, most of them: 80 of
            # the 100 trained the new model (the other ~20 are its wild test set), and the
            # stumps grown by 60 rounds read digits they trained on nearly always and unseen
            # ones about 90% of the time; the stumps alone read about a third of them.
            now_read = np.array(_read(server, drawings))
            assert (now_read == labels).mean() >= 0.85
            assert (now_read == labels).mean() > (np.array(weak_read) == labels).mean() + 0.2
        finally:
            stop_service(process)

    mlflow = stack["mlflow"]
    experiment = requests.get(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name",
                              params={"experiment_name": "e2e-feedback"}, timeout=10).json()
    runs = requests.post(f"{mlflow}/api/2.0/mlflow/runs/search", timeout=10, json={
        "experiment_ids": [experiment["experiment"]["experiment_id"]]}).json()["runs"]
    parent = next(r for r in runs if not any(t["key"] == "mlflow.parentRunId"
                                             for t in r["data"]["tags"]))
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    weak_run = next(r["info"]["run_id"] for r in _mlflow_runs(stack, "e2e-weak")
                    if "mlflow.parentRunId" not in _tags(r))
    (weak_version,) = requests.get(
        f"{mlflow}/api/2.0/mlflow/model-versions/search", timeout=10,
        params={"filter": f"name='mnist-digits' and run_id='{weak_run}'"}).json()[
        "model_versions"]
    assert params["warm_start.base_version"] == weak_version["version"]
    assert params["warm_start.base_rounds"] == "1"
    assert not [r for r in runs if r is not parent]  # a warm start trains no folds
    assert metrics["wild_rows"] + metrics["feedback_train_rows"] / 2 == 100  # 1 copy each
    assert 0.5 < metrics["wild_accuracy"] <= 1.0
    inputs = {d["dataset"]["name"] for d in parent["inputs"]["dataset_inputs"]}
    assert inputs == {"mnist-train", "mnist-test", "feedback", "feedback-wild", "pen-drawings",
                      "pen-drawn-test"}
    assert metrics["drawn_rows"] > 0 and 0.3 < metrics["drawn_accuracy"] <= 1.0


CRASH_ALGORITHMS = """
lgbm:
  kind: gbdt
  rounds: 120
  params: {learning_rate: 0.2, num_leaves: 31, min_data_in_leaf: 10, max_bin: 63}
"""


def _mlflow_runs(stack: dict, experiment_name: str) -> list[dict]:
    mlflow = stack["mlflow"]
    experiment = requests.get(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name",
                              params={"experiment_name": experiment_name}, timeout=10)
    if experiment.status_code != 200:
        return []
    return requests.post(f"{mlflow}/api/2.0/mlflow/runs/search", timeout=10, json={
        "experiment_ids": [experiment.json()["experiment"]["experiment_id"]],
        "max_results": 1000}).json().get("runs", [])


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_a_killed_worker_run_is_finished_by_a_live_worker(stack, shared_mnist, tmp_path):
    """Fault (a) of issue 12, on real processes: the worker and every process it started are
    SIGKILLed while fits train, as when its machine is lost. Nobody intervenes: the flow
    run's heartbeats stop, the stack's automations mark it Crashed and schedule it again, a
    second worker runs it, the rerun reuses the fits that had finished (and trains the
    rest), and MLflow shows the dead attempt KILLED and the rerun FINISHED."""
    import psutil
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    algorithms = tmp_path / "algorithms.yaml"
    algorithms.write_text(CRASH_ALGORITHMS)
    script = str(REPO / "infra" / "stack.sh")
    with _prefect_client(stack["prefect"]) as client:
        flow_run = client.create_flow_run_from_deployment(
            client.read_deployment_by_name("train-mnist/train").id,
            parameters={"algorithms_path": str(algorithms), "spec": {
                "sources": [str(shared_mnist)], "limit": 4000,
                "folds": {"kind": "kfold", "k": 4}, "experiment": "e2e-crash"}})
        # Kill when the first fold has been logged and others still train.
        def fold_logged() -> bool:
            state = client.read_flow_run(flow_run.id).state
            assert not state.is_final(), f"ended {state.type} before the kill"
            return any(_tags(r).get("mlflow.parentRunId")
                       for r in _mlflow_runs(stack, "e2e-crash"))

        wait_for(fold_logged, "a fold to finish", timeout_s=420, interval_s=0.5)
        assert not client.read_flow_run(flow_run.id).state.is_final()
        spare = subprocess.run([script, "worker"], env=stack["env"], capture_output=True,
                               text=True, timeout=60)
        assert spare.returncode == 0, spare.stderr
        worker = psutil.Process(int((stack["state"] / "prefect-worker.pid").read_text()))
        started = worker.children(recursive=True)
        assert started, "the worker runs no flow run process"
        os.killpg(worker.pid, signal.SIGKILL)
        for process in started:  # the flow run's process has a session of its own
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        killed_at = time.monotonic()

        # Crashed is final, but here only a step: the automation schedules the run again.
        state = _wait_until_final(client, flow_run.id, timeout_s=600, passing={"CRASHED"})
        assert state.is_completed(), f"{state.type}: {state.message}"
        rerun = client.read_flow_run(flow_run.id)
        assert rerun.run_count >= 2
        history = [s.type for s in client.read_flow_run_states(flow_run.id)]
        assert StateType.CRASHED in history
        assert time.monotonic() - killed_at < 480
        left_running = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
        assert not left_running

    runs = _mlflow_runs(stack, "e2e-crash")
    parents = [r for r in runs if "mlflow.parentRunId" not in _tags(r)]
    assert sorted(r["info"]["status"] for r in parents) == ["FINISHED", "KILLED"]
    dead, live = sorted(parents, key=lambda r: r["info"]["status"] != "KILLED")
    assert all(_tags(p)["prefect.flow_run_id"] == str(flow_run.id) for p in parents)

    def folds(parent: dict) -> dict[str, dict]:
        return {_tags(r)["mlflow.runName"]: r for r in runs
                if _tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]}

    finished_before, rerun_folds = folds(dead), folds(live)
    assert sorted(rerun_folds) == ["fold-0", "fold-1", "fold-2", "fold-3"]
    assert 1 <= len(finished_before) < 4
    for name in finished_before:  # not trained again
        assert _tags(rerun_folds[name])["mlpaint.fit_reused"] == "true"
    assert any(_tags(r)["mlpaint.fit_reused"] == "false" for r in rerun_folds.values())
    assert not [r for r in runs if r["info"]["status"] == "RUNNING"]


TWICE_ALGORITHMS = """
lgbm:
  kind: gbdt
  rounds: 60
  params: {learning_rate: 0.2, num_leaves: 31, min_data_in_leaf: 10, max_bin: 63}
"""


def test_two_runs_at_once_take_turns_and_survive_an_mlflow_outage_and_a_database_restart(
        stack, shared_mnist, tmp_path):
    """Faults (b), (c) and (d) of issue 12 on the PostgreSQL stack, and one training run at a
    time: two training runs asked for at once (as a scheduled run and a UI run would be),
    both publishing to one folder, train one after the other from the `training` queue, the
    second waiting (never refused, never beside the first). While they are not done,
    PostgreSQL, under both servers, is restarted, then the MLflow server is down for 30 s.
    Both runs complete with one MLflow run per fit (no duplicates, none left RUNNING), and
    the registry's champion and LATEST name the same version. (Their models, 60 rounds of
    31 leaves on 4,000 rows, beat every model the tests before published, at most 40 rounds
    of 15 leaves on 3,000, so one of them becomes the champion.)"""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    algorithms = tmp_path / "algorithms.yaml"
    algorithms.write_text(TWICE_ALGORITHMS)
    bundles = tmp_path / "bundles"
    script = str(REPO / "infra" / "stack.sh")
    with _prefect_client(stack["prefect"]) as client:
        deployment = client.read_deployment_by_name("train-mnist/train")
        assert deployment.work_queue_name == "training"
        flow_runs = [client.create_flow_run_from_deployment(deployment.id, parameters={
            "algorithms_path": str(algorithms), "publish_to": str(bundles), "spec": {
                "sources": [str(shared_mnist)], "limit": 4000,
                "folds": {"kind": "kfold", "k": 3}, "seed": seed,
                "experiment": "e2e-twice"}}) for seed in (1, 2)]
        wait_for(lambda: any(_tags(r).get("mlflow.parentRunId")
                             for r in _mlflow_runs(stack, "e2e-twice")),
                 "a fold to finish", timeout_s=420, interval_s=0.5)
        # One trains; the other waits its turn in the queue.
        states = [client.read_flow_run(r.id).state for r in flow_runs]
        assert sorted(s.type.value for s in states) == ["RUNNING", "SCHEDULED"], states
        for args in (["postgres"], ["mlflow-server", "30"]):  # each while a run is not done
            assert not all(client.read_flow_run(r.id).state.is_final() for r in flow_runs)
            restarted = subprocess.run([script, "restart", *args], env=stack["env"],
                                       capture_output=True, text=True, timeout=300)
            assert restarted.returncode == 0, restarted.stderr[-3000:]
        states = [_wait_until_final(client, r.id, timeout_s=900) for r in flow_runs]
        assert all(s.is_completed() for s in states), [(s.type, s.message) for s in states]
        left_running = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
        assert not left_running
        # The later run was taken from the queue only while the first held no slot: after
        # it ended, or while it waited to retry a failure (its deployment retries once, in
        # its own process, and a run waiting to retry frees its slot).
        histories = [sorted(client.read_flow_run_states(r.id), key=lambda s: s.timestamp)
                     for r in flow_runs]
        first, later = sorted(histories, key=lambda h: next(
            s.timestamp for s in h if s.type == StateType.PENDING))
        taken = next(s.timestamp for s in later if s.type == StateType.PENDING)
        first_then = [s for s in first if s.timestamp <= taken][-1]
        assert first_then.type not in (StateType.PENDING, StateType.RUNNING), [
            [(s.name, s.timestamp.isoformat(), s.message) for s in h] for h in histories]
        attempts = {str(r.id): client.read_flow_run(r.id).run_count for r in flow_runs}

    runs = _mlflow_runs(stack, "e2e-twice")
    assert not [r for r in runs if r["info"]["status"] != "FINISHED"]
    parents = [r for r in runs if "mlflow.parentRunId" not in _tags(r)]
    # One whole experiment per flow run; a flow run the outage made retry (its deployment
    # retries once) may have finished one in its first attempt and logs another in its
    # second, fits reused: never more than one per attempt, never a partial one.
    per_flow_run = collections.Counter(_tags(p)["prefect.flow_run_id"] for p in parents)
    assert set(per_flow_run) == set(attempts)
    assert all(1 <= per_flow_run[run] <= attempts[run] for run in attempts), (
        per_flow_run, attempts)
    for parent in parents:
        folds = sorted(_tags(r)["mlflow.runName"] for r in runs
                       if _tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"])
        assert folds == ["fold-0", "fold-1", "fold-2"]
    champion = requests.get(f"{stack['mlflow']}/api/2.0/mlflow/registered-models/alias",
                            params={"name": "mnist-digits", "alias": "champion"},
                            timeout=10).json()["model_version"]
    latest = json.loads((bundles / "versions" / (bundles / "LATEST").read_text().strip()
                         / "bundle.json").read_text())
    assert latest["model_version"] == champion["version"]


def test_a_deployment_run_trains_on_the_dask_cluster_its_job_variables_name(
        stack, shared_mnist, s3_env, tmp_path):
    """The training deployment, unchanged, sends its fits to a Dask cluster when a run's job
    variables set MLPAINT_DASK_ADDRESS: every fit runs in the `dask worker` we started (a
    home and cache of its own, the store a bucket on the moto S3 endpoint), and the MLflow
    tree is whole."""
    import boto3
    from mlflow import MlflowClient

    from flows.runners import DASK_ADDRESS_ENV
    from tests.servers.dask_cluster import dask_cluster

    algorithms = tmp_path / "algorithms.yaml"
    algorithms.write_text(TINY_ALGORITHMS)
    store = "s3://mlpaint-store/dask-deployment"
    boto3.client("s3").create_bucket(Bucket="mlpaint-store")
    with dask_cluster(tmp_path, {"MLPAINT_STORE": store, **s3_env,
                                 "PREFECT_API_URL": stack["prefect"],
                                 "MLFLOW_TRACKING_URI": stack["mlflow"]}) as cluster, \
            _prefect_client(stack["prefect"]) as client:
        address, worker_group, _ = cluster
        deployment = client.read_deployment_by_name("train-mnist/train")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={
            "algorithms_path": str(algorithms), "spec": experiment_spec("default", {
                "sources": [str(shared_mnist)], "limit": 1200, "experiment": "e2e-dask",
                "folds": {"kind": "kfold", "k": 2}, "augment": {"copies": 1}})["spec"]},
            job_variables={"env": {DASK_ADDRESS_ENV: address, "MLPAINT_STORE": store,
                                   **s3_env}})
        state = _wait_until_final(client, run.id)
        assert state.is_completed(), f"{state.type}: {state.message}"

        (parent,) = [r for r in _mlflow_runs(stack, "e2e-dask")
                     if "mlflow.parentRunId" not in _tags(r)]
        assert _tags(parent)["prefect.flow_run_id"] == str(run.id)
        summary = json.loads(Path(MlflowClient(stack["mlflow"]).download_artifacts(
            parent["info"]["run_id"], "summary.json", str(tmp_path))).read_text())
        fits = [*summary["folds"], summary["test"]]
        assert [f["name"] for f in fits] == ["fold-0", "fold-1", "final"]
        for fit in fits:  # each ran in the worker we started, while it still runs
            assert not fit["reused"]
            pid = int(fit["worker"].rsplit(":", 1)[1])
            assert os.getpgid(pid) == worker_group, fit["worker"]
    keys = [item["Key"] for item in boto3.client("s3").list_objects_v2(
        Bucket="mlpaint-store", Prefix="dask-deployment/fits/")["Contents"]]
    assert len([key for key in keys if key.endswith("/manifest.json")]) == 3
