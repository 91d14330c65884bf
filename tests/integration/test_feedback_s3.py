"""The feedback store under an S3 prefix on the moto server: the same guarantees as a local
folder, through conditional PUTs."""

from concurrent.futures import ProcessPoolExecutor

import boto3
import pytest

from mlpaint.feedback.store import FeedbackStore
from tests.unit.test_feedback_store import _append, _record

pytestmark = pytest.mark.integration


def test_s3_feedback_store_appends_once_and_rejects_beside(s3_env):
    boto3.client("s3").create_bucket(Bucket="feedback-once")
    uri = "s3://feedback-once/app/feedback"
    batches = [list(range(start, start + 20)) for start in (0, 10, 20)]
    with ProcessPoolExecutor(3) as pool:
        created = sum(pool.map(_append, [uri] * 3, batches))
    assert created == 40
    store = FeedbackStore.at(uri)
    assert len(store.ids()) == 40
    again = _record(5, 5, answered_digit=1)
    assert not store.add(again)
    assert store.get(again.id).answered_digit is None  # the first write stays
    assert store.reject(again.id, "smudge") == (again.id, True)
    assert len(store.accepted()) == 39 and len(store.ids()) == 40
    keys = [item["Key"] for item in boto3.client("s3").list_objects_v2(
        Bucket="feedback-once")["Contents"]]
    assert all(key.startswith("app/feedback/records/") or
               key == f"app/feedback/rejections/{again.id}.json" for key in keys)
