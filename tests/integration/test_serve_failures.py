"""`mlpaint serve` refuses to start, with one line and a non-zero status, when it could not
serve: a supervisor (systemd, Kubernetes) must not take a failed start for a clean stop."""

import os
import shutil
import socket

import pytest

from mlpaint.processes import free_port
from tests.conftest import run_cli

pytestmark = pytest.mark.integration


def _serve(args: list[str], env: dict) -> tuple[int, list[str]]:
    done = run_cli(["serve", "--port", str(free_port()), *args], env, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("mlpaint: error")]
    return done.returncode, errors


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "MLPAINT_FEEDBACK_STORE": str(tmp_path / "feedback")}


def test_a_missing_bundle(env, tmp_path):
    status, errors = _serve(["--bundle", str(tmp_path / "nothing-here")], env)
    assert status == 1 and len(errors) == 1
    assert "no LATEST pointer" in errors[0] and "--publish-to" in errors[0]


def test_a_tampered_bundle(bundle_root, env, tmp_path):
    copy = tmp_path / "bundles"
    shutil.copytree(bundle_root / "bundles", copy)
    booster = next(copy.glob("versions/*/model/booster-0.txt"))
    booster.write_text(booster.read_text() + "\n")
    status, errors = _serve(["--bundle", str(copy)], env)
    assert status == 1 and len(errors) == 1 and "does not match the manifest" in errors[0]


def test_a_partial_bundle(bundle_root, env, tmp_path):
    copy = tmp_path / "bundles"
    shutil.copytree(bundle_root / "bundles", copy)
    next(copy.glob("versions/*/gallery/gallery.npz")).unlink()
    status, errors = _serve(["--bundle", str(copy)], env)
    assert status == 1 and len(errors) == 1 and "gallery.npz" in errors[0]


def test_a_port_in_use(bundle_root, env):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = run_cli(["serve", "--bundle", str(bundle_root / "bundles"), "--port",
                        str(port)], env, timeout=120)
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in done.stderr


def test_an_unwritable_feedback_store(bundle_root, env, tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    status, errors = _serve(["--bundle", str(bundle_root / "bundles"), "--feedback-store",
                             str(blocked / "feedback")], env)
    assert status == 1 and len(errors) == 1
    assert "feedback store" in errors[0] and "--feedback-store off" in errors[0]


def test_an_unreachable_s3_feedback_store(bundle_root, env):
    dead = f"http://127.0.0.1:{free_port()}"
    status, errors = _serve(["--bundle", str(bundle_root / "bundles"), "--feedback-store",
                             "s3://feedback-bucket/fb"],
                            {**env, "AWS_ENDPOINT_URL": dead, "AWS_ACCESS_KEY_ID": "x",
                             "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"})
    assert status == 1 and len(errors) == 1 and "bucket not reachable" in errors[0]


