"""Per-run work areas in the cache, and the sweep of what runs killed outright left there."""

import os
import time

import pytest

from mlpaint.storage.catalog import STALE_AFTER_SECONDS, sweep_stale_work, work_area


def test_a_work_area_is_its_own_and_is_removed_however_the_block_ends(tmp_path):
    with work_area(tmp_path, "publish-v1") as first, work_area(tmp_path, "publish-v1") as second:
        assert first != second and first.is_dir() and second.is_dir()
        (first / "bundle.json").write_text("{}")
    assert not first.exists() and not second.exists()
    with pytest.raises(RuntimeError), work_area(tmp_path, "publish-v2") as failed:
        raise RuntimeError("the gate failed")
    assert not failed.exists()


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_sweep_removes_only_stale_staging_and_work_areas(tmp_path):
    finished = tmp_path / "fits" / "0123abcd"
    finished.mkdir(parents=True)
    (finished / "fit.json").write_text("{}")
    dead_staging = tmp_path / "fits" / ".0123abcd.x1y2"
    live_staging = tmp_path / "features" / ".4567.z9"
    dead_work = tmp_path / "work" / "publish-v3-abc"
    legacy_work = tmp_path / "publish" / "bundle-v2-def"
    for folder in (dead_staging, live_staging, dead_work, legacy_work):
        folder.mkdir(parents=True)
        (folder / "part.npy").write_bytes(b"0" * 10)
    for folder in (finished, dead_staging, dead_work, legacy_work):
        _age(folder, STALE_AFTER_SECONDS + 60)

    removed = sweep_stale_work(tmp_path)
    assert sorted(removed) == sorted([dead_staging, dead_work, legacy_work])
    assert finished.is_dir() and live_staging.is_dir()
    assert sweep_stale_work(tmp_path) == []
