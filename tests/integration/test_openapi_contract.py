"""The OpenAPI document is the contract: schemathesis's own command (`st run`, every check,
every phase: the schema's examples, its coverage phase of boundary and edge values, fuzzing)
generates requests from /openapi.json for every endpoint of a running `mlpaint serve`
(feedback on) and checks the answers: no 5xx, documented status codes and content types,
responses matching their schemas, schema-valid bodies accepted and schema-invalid ones
rejected. The run is the one an outsider would make, with the contract's one documented
exception (tests/integration/schemathesis.toml) as its configuration and a check that holds
that exception to its reason (tests/integration/contract_checks.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from mlpaint.processes import free_port, start_service, stop_service

pytestmark = pytest.mark.integration

CONFIG_FILE = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def server(bundle_root, tmp_path_factory):
    logs = tmp_path_factory.mktemp("contract")
    port = free_port()
    process = start_service(
        [str(Path(sys.executable).parent / "mlpaint"), "serve", "--bundle",
         str(bundle_root / "bundles"), "--port", str(port), "--workers", "1",
         "--watch-seconds", "0", "--feedback-store", str(logs / "feedback"),
         "--feedback-rate", "100000/minute"],
        f"http://127.0.0.1:{port}/readyz", env={**os.environ}, log=logs / "serve.log",
        timeout_s=120)
    yield f"http://127.0.0.1:{port}"
    stop_service(process)


def test_every_endpoint_keeps_its_contract(server, tmp_path):
    paths = requests.get(f"{server}/openapi.json", timeout=10).json()["paths"]
    assert {f"{method.upper()} {path}" for path, methods in paths.items()
            for method in methods} >= {
        "POST /v1/predict", "POST /v1/explain", "POST /v1/feedback", "GET /v1/examples",
        "GET /v1/model", "GET /readyz", "GET /healthz"}
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(CONFIG_FILE),
         "run", f"{server}/openapi.json", "--checks", "all", "--max-examples", "60",
         "--seed", "20261128", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,  # its cache goes there
        env={**os.environ, "SCHEMATHESIS_HOOKS": "contract_checks",
             "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                            os.environ.get("PYTHONPATH", "")])})
    assert run.returncode == 0, run.stdout[-6000:]
    assert "✅ Coverage" in run.stdout and "✅ Fuzzing" in run.stdout, run.stdout[-3000:]
    assert "Tested: 7" in run.stdout
