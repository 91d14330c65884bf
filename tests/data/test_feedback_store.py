"""Data tests of the feedback store, the data set that grows while the product runs: a store
filled as the server fills it (pen digits drawn on the page's canvas, decoded and
preprocessed by the server's own functions) passes every check, and each defect training
would suffer from, planted in such a store, is found on exactly the record it is in."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from mlpaint.feedback.checks import Check, check_feedback_store
from mlpaint.feedback.store import FeedbackRecord, FeedbackStore, record_id
from mlpaint.images.drawing import PenStyle, draw_on_canvas
from mlpaint.serving.drawings import digit_of_drawing

pytestmark = pytest.mark.data

DRAWINGS = 40


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def drawings(pen_table) -> list[tuple[int, bytes, np.ndarray]]:
    """(label, PNG as the page posts it, the server's 784 pixels of it) for pen digits of
    many writers: the store holds the first DRAWINGS, the last two are planted."""
    rng = np.random.default_rng(7)
    rows = rng.choice(len(pen_table), DRAWINGS + 2, replace=False)
    made = []
    for row in rows.tolist():
        png = _png(draw_on_canvas(pen_table.strokes(row), PenStyle(), rng))
        pixels, drawn = digit_of_drawing(png)
        assert drawn
        made.append((int(pen_table.labels[row]), png, pixels.reshape(-1)))
    return made


@pytest.fixture
def store(tmp_path, drawings) -> FeedbackStore:
    """The drawings stored as the feedback endpoint stores them, a few answered wrongly."""
    store = FeedbackStore.at(str(tmp_path / "feedback"))
    for index, (label, png, pixels) in enumerate(drawings[:DRAWINGS]):
        answered = (label + 1) % 10 if index % 4 == 0 else label
        assert store.add(FeedbackRecord.new(label=label, pixels=pixels, drawing=png,
                                            drawing_media_type="image/png",
                                            answered_digit=answered,
                                            bundle_version="20260101T000000Z-v1"))
    return store


def _write(store: FeedbackStore, key: str, body: bytes) -> None:
    assert store.store.create(key, body)


def test_a_store_filled_as_the_server_fills_it_passes(store, drawings):
    report = check_feedback_store(store)
    assert report.findings == [], report.lines()
    assert report.passed and report.records == DRAWINGS
    assert report.label_counts == np.bincount([d[0] for d in drawings[:DRAWINGS]],
                                              minlength=10).tolist()
    assert report.corrected == len(range(0, DRAWINGS, 4))


def _edited(record: FeedbackRecord, **changes) -> bytes:
    doc = json.loads(record.to_bytes())
    doc.update(changes)
    return json.dumps(doc).encode()


def _plant(kind: Check, store: FeedbackStore, drawings) -> str:
    """Put one record (or rejection) with defect `kind` into `store`; its id (for an
    unreadable object, its key). Stored drawings are edited or repeated where the defect
    is about them; otherwise the two drawings the store does not hold are used."""
    stored_label, _, stored_pixels = drawings[0]
    label, png, pixels = drawings[DRAWINGS]
    other_label, other_png, _ = drawings[DRAWINGS + 1]
    if kind is Check.UNREADABLE:
        _write(store, "records/0badc0de.json", b'{"format_version": 1, "label": ')
        return "records/0badc0de.json"
    if kind is Check.MISNAMED:
        record = FeedbackRecord.new(label=label, pixels=pixels, drawing=png)
        _write(store, f"records/{'f' * 32}.json", record.to_bytes())
        return record.id
    if kind is Check.ID_MISMATCH:  # a stored record's label edited in place
        record = next(r for r in store.records()
                      if np.array_equal(r.pixels, stored_pixels))
        store.store.put_bytes(f"records/{record.id}.json",
                              _edited(record, label=(stored_label + 5) % 10))
        return record.id
    if kind is Check.PREPROCESSING_DRIFT:  # pixels no longer what the drawing gives
        record = FeedbackRecord.new(label=other_label, pixels=pixels, drawing=other_png)
        _write(store, f"records/{record.id}.json", record.to_bytes())
        return record.id
    if kind is Check.UNDECODABLE_DRAWING:
        record = FeedbackRecord.new(label=label, pixels=pixels, drawing=b"not an image",
                                    drawing_media_type="image/png")
        _write(store, f"records/{record.id}.json", record.to_bytes())
        return record.id
    if kind is Check.NOTHING_DRAWN:
        record = FeedbackRecord.new(label=label, pixels=np.zeros(784, np.uint8))
        store.add(record)
        return record.id
    if kind is Check.CONFLICTING_LABELS:  # the same digit, sent as pixels, another label
        record = FeedbackRecord.new(label=(stored_label + 3) % 10, pixels=stored_pixels)
        store.add(record)
        return record.id
    if kind is Check.DUPLICATE_DIGIT:  # the same digit, sent as pixels, the same label
        record = FeedbackRecord.new(label=stored_label, pixels=stored_pixels)
        store.add(record)
        return record.id
    assert kind is Check.DANGLING_REJECTION
    gone = record_id(4, b"never stored")
    _write(store, f"rejections/{gone}.json",
           json.dumps({"id": gone, "reason": "", "rejected_at": "2026-01-01T00:00:00Z"})
           .encode())
    return gone


@pytest.mark.parametrize("kind", list(Check), ids=lambda kind: kind.value)
def test_each_defect_is_found_on_its_record_alone(store, drawings, kind):
    planted = _plant(kind, store, drawings)
    report = check_feedback_store(store)
    assert [(f.check, f.record_id) for f in report.findings] == [(kind, planted)], \
        report.lines()
    assert report.passed is (kind.severity.value == "warning")


def test_the_command_fails_on_an_error_and_names_it(store, drawings):
    command = [sys.executable, "-m", "flows.cli", "feedback", "check",
               "--store", store.describe()]
    clean = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.strip().endswith("passed")
    planted = _plant(Check.CONFLICTING_LABELS, store, drawings)
    failed = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1, failed.stderr
    report = json.loads(failed.stdout)
    assert report["passed"] is False
    assert [(f["check"], f["id"], f["severity"]) for f in report["findings"]] == [
        ("conflicting-labels", planted, "error")]
