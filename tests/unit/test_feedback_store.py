"""The feedback store on a local folder: content addresses, append-only writes, rejections,
CSV export, and several processes appending at once."""

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mlpaint.data.formats import read_csv_split
from mlpaint.feedback.store import FeedbackError, FeedbackRecord, FeedbackStore, write_csv
from mlpaint.storage import stores as storage
from mlpaint.storage.stores import LocalStore, sibling_uri


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, 784, dtype=np.uint8)


def _record(seed: int, label: int, drawing: bytes | None = None, **kwargs) -> FeedbackRecord:
    return FeedbackRecord.new(label=label, pixels=_pixels(seed), drawing=drawing,
                              drawing_media_type="image/png" if drawing else None, **kwargs)


def test_the_same_drawing_and_label_is_one_record(tmp_path):
    store = FeedbackStore.at(str(tmp_path / "fb"))
    first = _record(1, 3, b"png-bytes", answered_digit=5, bundle_version="b1")
    again = _record(1, 3, b"png-bytes", answered_digit=8, bundle_version="b2")
    relabelled = _record(1, 4, b"png-bytes")
    assert first.id == again.id != relabelled.id
    assert store.add(first) and not store.add(again) and store.add(relabelled)
    assert sorted(store.ids()) == sorted([first.id, relabelled.id])
    kept = store.get(first.id)  # the first record stays as it was written
    assert kept.answered_digit == 5 and kept.bundle_version == "b1" and kept.corrected
    assert kept.drawing == b"png-bytes" and np.array_equal(kept.pixels, first.pixels)


def test_pixel_records_and_prefix_lookup(tmp_path):
    store = FeedbackStore.at(str(tmp_path / "fb"))
    record = _record(2, 7)
    store.add(record)
    found = store.get(record.id[:8])
    assert found.drawing is None and found.label == 7 and not found.corrected
    with pytest.raises(FeedbackError, match="at least 6"):
        store.get(record.id[:3])
    with pytest.raises(FeedbackError, match="no such record"):
        store.get("ffffffffff" if not record.id.startswith("ffff") else "0000000000")


def test_invalid_records_are_refused():
    with pytest.raises(FeedbackError, match="not a digit"):
        _record(1, 10)
    with pytest.raises(FeedbackError, match="784 uint8"):
        FeedbackRecord.new(label=1, pixels=np.zeros(783, np.uint8))


def test_reject_adds_an_exclusion_and_deletes_nothing(tmp_path):
    store = FeedbackStore.at(str(tmp_path / "fb"))
    keep, drop = _record(3, 1), _record(4, 2)
    store.add(keep)
    store.add(drop)
    assert store.reject(drop.id[:10], "scribble") == (drop.id, True)
    assert store.reject(drop.id, "again") == (drop.id, False)
    assert store.rejections()[drop.id].reason == "scribble"  # the first reason stays
    assert [r.id for r in store.accepted()] == [keep.id]
    assert sorted(store.ids()) == sorted([keep.id, drop.id])  # the record is still there


def test_export_is_read_back_by_the_csv_source(tmp_path):
    records = [_record(seed, seed % 10) for seed in range(12)]
    path = tmp_path / "feedback-train.csv"
    assert write_csv(records, path) == 12
    images, labels = read_csv_split(path)
    assert labels.tolist() == [r.label for r in records]
    assert np.array_equal(images.reshape(12, -1), np.stack([r.pixels for r in records]))


@pytest.mark.parametrize("unnamed_files", [True, False], ids=["o_tmpfile", "scratch_file"])
def test_local_create_never_overwrites(tmp_path, monkeypatch, unnamed_files):
    """Both ways of creating: an unnamed file linked into place (Linux), and a named scratch
    file where that is not allowed."""
    if unnamed_files:
        if storage._linkat() is None:
            pytest.skip("no O_TMPFILE and linkat(2) here")
        assert storage._create_unnamed_then_link(tmp_path / "probe", b"") is True

        def no_scratch_file(*_):
            raise AssertionError("create fell back to a named scratch file")

        monkeypatch.setattr(storage, "scratch_path", no_scratch_file)
    else:
        monkeypatch.setattr(storage, "_create_unnamed_then_link", lambda *_: None)
    store = LocalStore(tmp_path)
    assert store.create("a/b.json", b"first") and not store.create("a/b.json", b"second")
    assert store.create("new/folder/c.json", b"third")
    assert store.get_bytes("a/b.json") == b"first"
    assert store.get_bytes("new/folder/c.json") == b"third"
    assert (tmp_path / "a/b.json").stat().st_mode & 0o777 == 0o644
    assert store.list_keys("a") == ["a/b.json"]  # no scratch file is left behind
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def _append(root: str, seeds: list[int]) -> int:
    store = FeedbackStore.at(root)
    return sum(store.add(_record(seed, seed % 10)) for seed in seeds)


def test_processes_appending_at_once_lose_and_duplicate_nothing(tmp_path):
    root = str(tmp_path / "fb")
    # Four processes, each posting 60 drawings of which 30 another process also posts.
    batches = [list(range(start, start + 60)) for start in (0, 30, 60, 90)]
    with ProcessPoolExecutor(4) as pool:
        created = sum(pool.map(_append, [root] * 4, batches))
    unique = set(range(150))
    assert created == len(unique)
    store = FeedbackStore.at(root)
    assert len(store.ids()) == len(unique)
    assert {r.id for r in store.records()} == {_record(s, s % 10).id for s in unique}
    assert not [p for p in Path(root).rglob(".*")]  # no scratch files


def test_sibling_locations():
    assert sibling_uri("/srv/mlpaint/bundles", "feedback") == "/srv/mlpaint/feedback"
    assert sibling_uri("s3://b/app/bundles/", "feedback") == "s3://b/app/feedback"
    assert sibling_uri("s3://b/bundles", "feedback") == "s3://b/feedback"


def test_the_wild_set_is_a_stable_share_chosen_by_record():
    from mlpaint.feedback.store import feedback_row_hashes, record_id, wild_rows

    ids = [record_id(i % 10, i.to_bytes(4, "little")) for i in range(3000)]
    wild = wild_rows(feedback_row_hashes(ids), 0.2)
    assert 0.17 < wild.mean() < 0.23
    # A record's membership does not depend on what else the store holds.
    subset = ids[::7]
    assert np.array_equal(wild_rows(feedback_row_hashes(subset), 0.2), wild[::7])
    assert not wild_rows(feedback_row_hashes(ids), 0.01).sum() > wild.sum()


def test_snapshot_leaves_rejected_records_out(tmp_path):
    from mlpaint.feedback.store import FeedbackSnapshot

    store = FeedbackStore.at(str(tmp_path / "fb"))
    records = [_record(seed, seed % 10) for seed in range(6)]
    for record in records:
        store.add(record)
    store.reject(records[2].id, "")
    snapshot = FeedbackSnapshot.of(store)
    assert snapshot.rejected == 1 and len(snapshot.ids) == 5
    assert records[2].id not in snapshot.ids and list(snapshot.ids) == sorted(snapshot.ids)
    by_id = {r.id: r for r in records}
    assert [int(label) for label in snapshot.labels] == [by_id[i].label for i in snapshot.ids]
    before = snapshot.digest
    store.add(_record(99, 9))
    assert FeedbackSnapshot.of(store).digest != before


def test_a_whole_store_is_read_in_order_at_most_read_ahead_records_ahead(tmp_path,
                                                                         monkeypatch):
    from mlpaint.feedback import store as feedback

    store = FeedbackStore.at(str(tmp_path / "fb"))
    records = [_record(seed, seed % 10) for seed in range(3 * feedback.READ_AHEAD)]
    for record in records:
        store.add(record)
    reads = []
    read = LocalStore.get_bytes
    monkeypatch.setattr(LocalStore, "get_bytes",
                        lambda self, key: reads.append(key) or read(self, key))
    consumed = 0
    for _ in store.records():
        consumed += 1
        # The reads never run more than READ_AHEAD records ahead of the one being parsed.
        assert consumed <= len(reads) <= consumed + feedback.READ_AHEAD
    assert consumed == len(records) and len(reads) == len(records)
    assert [r.id for r in store.records()] == sorted(r.id for r in records)  # id order
