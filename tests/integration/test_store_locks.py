"""A store's lock is one critical section across processes, on a local folder (flock) and on
an S3 prefix (a lease taken with conditional writes, on the moto server)."""

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor

import boto3
import pytest

from mlpaint.storage.stores import LOCKS_FOLDER, LockTimeoutError, store_for

pytestmark = pytest.mark.integration


def _hold_repeatedly(uri: str, times: int) -> list[tuple[float, float]]:
    """Enter the lock `times` times; when each stay began and ended."""
    store, stays = store_for(uri), []
    for _ in range(times):
        with store.lock("publish", timeout_s=60):
            began = time.time()
            time.sleep(0.05)
            stays.append((began, time.time()))
    return stays


def _assert_never_overlapping(stays: list[tuple[float, float]]) -> None:
    ordered = sorted(stays)
    for (_, end), (begin, _) in itertools.pairwise(ordered):
        assert begin >= end, "two processes were inside the lock at once"


@pytest.fixture(params=["folder", "s3"])
def lock_uri(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "bundles")
    request.getfixturevalue("s3_env")
    bucket = f"locks-{os.getpid()}-{time.monotonic_ns()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/app/bundles"


def test_three_processes_take_turns(lock_uri):
    with ProcessPoolExecutor(3) as pool:
        stays = [stay for result in pool.map(_hold_repeatedly, [lock_uri] * 3, [6] * 3)
                 for stay in result]
    assert len(stays) == 18
    _assert_never_overlapping(stays)


def test_a_held_lock_makes_a_waiter_give_up_with_the_reason(lock_uri):
    store = store_for(lock_uri)
    with store.lock("publish"), pytest.raises(LockTimeoutError, match="held by"), \
            store.lock("publish", timeout_s=1):
        pass
    with store.lock("publish", timeout_s=1):  # released on exit
        pass


def test_a_holder_killed_outright_does_not_block_a_folder(tmp_path):
    """flock is released by the kernel when its holder dies, even by SIGKILL."""
    uri = str(tmp_path / "bundles")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from mlpaint.storage.stores import store_for
        with store_for({uri!r}).lock("publish"):
            print("held", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockTimeoutError), store_for(uri).lock("publish", timeout_s=0.5):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with store_for(uri).lock("publish", timeout_s=5):
        pass


def test_an_expired_s3_lease_is_taken_over_and_a_live_one_is_not(s3_env):
    boto3.client("s3").create_bucket(Bucket="lease-expiry")
    uri = "s3://lease-expiry/bundles"
    key = f"bundles/{LOCKS_FOLDER}/publish.lock"
    s3 = boto3.client("s3")
    # A lease its holder left behind when it died, an hour past its expiry.
    s3.put_object(Bucket="lease-expiry", Key=key, Body=json.dumps(
        {"owner": "dead-host:1", "expires_at": time.time() - 3600}).encode())
    with store_for(uri).lock("publish", timeout_s=5):
        lease = json.loads(s3.get_object(Bucket="lease-expiry", Key=key)["Body"].read())
        assert lease["owner"] != "dead-host:1" and lease["expires_at"] > time.time()
    assert "Contents" not in s3.list_objects_v2(Bucket="lease-expiry", Prefix=key)
    # A live lease of another process is waited for, and the waiter says whose it is.
    s3.put_object(Bucket="lease-expiry", Key=key, Body=json.dumps(
        {"owner": "busy-host:2", "expires_at": time.time() + 3600}).encode())
    with pytest.raises(LockTimeoutError, match="busy-host:2"), \
            store_for(uri).lock("publish", timeout_s=1):
        pass
