"""The OpenAPI document is the contract: schemathesis generates requests from /openapi.json
for every endpoint of a running `mlpaint serve` (feedback on) and runs all of its checks on
the answers: no 5xx, documented status codes and content types, responses matching their
schemas, schema-valid bodies accepted and schema-invalid ones rejected."""

import itertools
import os
import sys
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.config import SchemathesisConfig

from mlpaint.processes import free_port, start_service, stop_service

pytestmark = pytest.mark.integration

# A schema cannot say "these bytes decode as an image", so a schema-valid `image` string that
# is not a decodable PNG or JPEG gets a documented 400. It is the only schema-valid input the
# API may refuse. A schema-invalid body is refused with 422, or, when it is too large to read
# (a batch far past its maxItems), with the documented 413 before anything parses it.
CONFIG = SchemathesisConfig.from_dict({
    "checks": {"positive_data_acceptance": {
        "expected-statuses": ["2xx", "400", "404", "429"]},
               "negative_data_rejection": {
        "expected-statuses": ["400", "404", "413", "422", "429"]}},
})


@pytest.fixture(scope="module")
def api_schema(bundle_root, tmp_path_factory):
    logs = tmp_path_factory.mktemp("contract")
    port = free_port()
    process = start_service(
        [str(Path(sys.executable).parent / "mlpaint"), "serve", "--bundle",
         str(bundle_root / "bundles"), "--port", str(port), "--workers", "1",
         "--watch-seconds", "0", "--feedback-store", str(logs / "feedback"),
         "--feedback-rate", "100000/minute"],
        f"http://127.0.0.1:{port}/readyz", env={**os.environ}, log=logs / "serve.log",
        timeout_s=120)
    yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json",
                                        config=CONFIG)
    stop_service(process)


def test_every_endpoint_keeps_its_contract(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/predict", "POST /v1/explain", "POST /v1/feedback", "GET /v1/examples",
        "GET /v1/model", "GET /readyz", "GET /healthz"}
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):
        # Positive: schema-valid requests must be accepted; negative: schema-invalid ones
        # must be refused with a 4xx (an operation that takes no input has none).
        if mode is schemathesis.GenerationMode.NEGATIVE and not (
                len(operation.body) or len(operation.query)):
            continue
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def keeps_its_contract(case):
            case.call_and_validate()

        keeps_its_contract()
