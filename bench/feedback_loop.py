"""From the 100th correction on the page to the server answering with the new model, at full
size on the stack.

    .venv/bin/python -m bench.feedback_loop --workdir /tmp/loop

1. `infra/stack.sh up` in `--workdir` (PostgreSQL, the Prefect server, a worker, the MLflow
   server, the deployments and the trigger), on free ports, the worker's cache in the
   workdir.
2. **The champion**: `mlpaint train --spec champion --publish-to <workdir>/bundles` against
   the stack's servers, in the worker's cache, as the weekly run leaves it; timed.
3. `mlpaint serve` on those bundles, storing people's answers in `<workdir>/feedback` and
   telling the Prefect server of each; the `train-on-feedback` deployment pointed at the
   same bundles, feedback store and MNIST.
4. **Corrections through the page's API**: `--candidates` training writers' pen digits
   drawn on the page's 280-pixel canvas with a seed no training rendering uses, read by the
   server (`/v1/predict`), and `--corrections` of them posted to `/v1/feedback` with their
   labels, those the champion reads wrong first.
5. Timed from the last correction's answer: the trigger's run (its start, its end), the
   server's swap to the new bundle. Then the corrections are read again through the server.

Reported: the champion's wall time and figures, each step's seconds after the last
correction, the run's gate reason, and how many corrections the server reads as their
labels before and after (the ~20% of them the run kept out as its wild test set apart).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests

from bench.robustness import data_url, pen_canvases, pen_table
from bench.services import timed_run
from bench.stack import stack_env
from bench.warm_start import CORRECTIONS_SEED
from mlpaint.processes import free_port, start_service, stop_service

logger = logging.getLogger("bench.feedback_loop")
REPO = Path(__file__).resolve().parents[1]
BATCH = 20  # drawings per request, well under the API's body limit


def _correction_canvases(count: int) -> tuple[list[str], np.ndarray]:
    """PNG data URLs of `count` training writers' pen digits drawn as the page draws (a new
    seed), to choose the corrections from, and their labels."""
    from mlpaint.images.drawing import drawn_test_rows

    table = pen_table(None)
    training = np.setdiff1d(np.arange(len(table)), drawn_test_rows(table, 0.2))
    rows = np.random.default_rng(CORRECTIONS_SEED).choice(training, count, replace=False)
    return ([data_url(png) for png in pen_canvases(table, rows, CORRECTIONS_SEED)],
            table.labels[rows].astype(int))


def _read(server: str, drawings: list[str]) -> np.ndarray:
    digits = []
    for start in range(0, len(drawings), BATCH):
        response = requests.post(f"{server}/v1/predict", timeout=60, json={
            "batch": [{"image": image} for image in drawings[start:start + BATCH]]})
        response.raise_for_status()
        digits += [p["digit"] for p in response.json()["predictions"]]
    return np.array(digits)


def _until(condition, what: str, timeout_s: float, interval_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"no {what} within {timeout_s:.0f} s")


def run(workdir: Path, mnist: Path, corrections: int, candidates: int) -> dict:
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from mlpaint.feedback.store import feedback_row_hashes, wild_rows
    from mlpaint.tracking import REGISTERED_MODEL_NAME
    from mlpaint.training.spec import load_spec

    env = {**stack_env(workdir / "stack"), "MLPAINT_CACHE_DIR": str(workdir / "cache")}
    # The stack's PostgreSQL runs as `postgres`, who must reach its data folder.
    (workdir / "stack").mkdir(parents=True)
    for folder in (workdir, workdir / "stack"):
        folder.chmod(0o711)
    script = str(REPO / "infra" / "stack.sh")
    up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        raise RuntimeError(up.stderr[-3000:])
    prefect = f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
    mlflow = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
    bundles, feedback = workdir / "bundles", workdir / "feedback"
    result: dict = {}
    server_process = None
    try:
        trained = timed_run(
            [str(Path(sys.executable).parent / "mlpaint"), "train", "--spec", "champion",
             "--source", str(mnist), "--publish-to", str(bundles), "--cache-dir",
             env["MLPAINT_CACHE_DIR"], "--json"],
            {**env, "PREFECT_API_URL": prefect, "MLFLOW_TRACKING_URI": mlflow},
            timeout_s=None, cwd=workdir)
        seconds, champion = trained.seconds, json.loads(trained.stdout)
        result["champion"] = {"wall_seconds": round(seconds, 1),
                              "test_accuracy": champion["test"]["statistics"]["accuracy"],
                              "version": champion["registered_model"]["version"]}
        logger.info("champion: %s", result["champion"])

        port = free_port()
        server = f"http://127.0.0.1:{port}"
        server_process = start_service(
            [str(Path(sys.executable).parent / "mlpaint"), "serve", "--bundle", str(bundles),
             "--port", str(port), "--workers", "1", "--feedback-store", str(feedback),
             "--feedback-rate", "1000/minute"],
            f"{server}/readyz", env={**env, "PREFECT_API_URL": prefect},
            log=workdir / "serve.log", timeout_s=180)
        champion_bundle = requests.get(f"{server}/readyz", timeout=5).json()["bundle_version"]

        with temporary_settings(updates={PREFECT_API_URL: prefect}), \
                get_client(sync_client=True) as client:
            triggered = client.read_deployment_by_name("train-mnist/train-on-feedback")
            spec = triggered.parameters["spec"]
            client.update_deployment(triggered.id, DeploymentUpdate(parameters={
                **triggered.parameters, "publish_to": str(bundles),
                "spec": {**spec, "sources": [str(mnist)],
                         "feedback": {**spec["feedback"], "store": str(feedback)}}}))

            drawings, labels = _correction_canvases(candidates)
            answers = _read(server, drawings)
            order = np.concatenate([np.flatnonzero(answers != labels),
                                    np.flatnonzero(answers == labels)])[:corrections]
            ids = []
            for row in order.tolist():
                response = requests.post(f"{server}/v1/feedback", timeout=30, json={
                    "image": drawings[row], "label": int(labels[row]),
                    "digit": int(answers[row])})
                response.raise_for_status()
                ids.append(response.json()["id"])
            last_correction = time.monotonic()
            chosen_drawings = [drawings[row] for row in order.tolist()]
            chosen_labels = labels[order]
            wild = wild_rows(feedback_row_hashes(ids), load_spec("champion").feedback.wild_share)
            before = answers[order] == chosen_labels

            flow_run = _until(lambda: client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[triggered.id]))), "triggered run", 300)[0]
            _until(lambda: client.read_flow_run(flow_run.id).state.type.value
                   not in ("SCHEDULED", "PENDING"), "run start", 600)
            started = time.monotonic()
            state = _until(lambda: (s := client.read_flow_run(flow_run.id).state).is_final()
                           and s, "run end", 3600, interval_s=5)
            ended = time.monotonic()
        new_bundle = (bundles / "LATEST").read_text().strip()
        swapped = None
        if state.is_completed() and new_bundle != champion_bundle:
            _until(lambda: requests.get(f"{server}/readyz", timeout=5).json().get(
                "bundle_version") == new_bundle, "swap", 300)
            swapped = time.monotonic()
        after = _read(server, chosen_drawings) == chosen_labels
        # The gate's reason, promoted or not, on the candidate's run (the newest version).
        tracking = MlflowClient(tracking_uri=mlflow)
        candidate = max(tracking.search_model_versions(f"name='{REGISTERED_MODEL_NAME}'"),
                        key=lambda version: int(version.version))
        gate_reason = tracking.get_run(candidate.run_id).data.tags.get("mlpaint.gate_reason")
        result["loop"] = {
            "corrections": len(ids), "champion_read_wrong": int((~before).sum()),
            "run_state": state.type.value,
            "seconds_to_run_start": round(started - last_correction, 1),
            "seconds_to_run_end": round(ended - last_correction, 1),
            "seconds_to_served": round(swapped - last_correction, 1) if swapped else None,
            "promoted": new_bundle != champion_bundle,
            "read_right_before": {"trained_on": round(float(before[~wild].mean()), 4),
                                  "wild": round(float(before[wild].mean()), 4)},
            "read_right_after": {"trained_on": round(float(after[~wild].mean()), 4),
                                 "wild": round(float(after[wild].mean()), 4)},
            "wild_rows": int(wild.sum()), "candidate_version": candidate.version,
            "gate_reason": gate_reason}
        logger.info("loop: %s", result["loop"])
    finally:
        if server_process is not None:
            stop_service(server_process)
        subprocess.run([script, "down"], env=env, capture_output=True, timeout=300)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a new folder")
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared/data/mnist")
    parser.add_argument("--corrections", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=3000,
                        help="drawings the server reads to choose the corrections from")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.workdir.exists():
        parser.error(f"{args.workdir} exists: name a new folder")
    print(json.dumps(run(args.workdir.resolve(), args.mnist, args.corrections,
                         args.candidates), indent=1))


if __name__ == "__main__":
    main()
