"""Where a training flow run's tasks run: chosen from MLPAINT_DASK_ADDRESS when it starts."""

import pytest
from prefect import task
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.runners import DASK_ADDRESS_ENV, ClusterOrThreadsTaskRunner


def test_the_setting_when_the_run_starts_chooses_the_runner(monkeypatch):
    runner = ClusterOrThreadsTaskRunner(max_workers=3)
    monkeypatch.delenv(DASK_ADDRESS_ENV, raising=False)
    threads = runner.choose()
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    monkeypatch.setenv(DASK_ADDRESS_ENV, " tcp://scheduler.example:8786 ")
    cluster = runner.duplicate().choose()
    assert isinstance(cluster, DaskTaskRunner)
    assert cluster.address == "tcp://scheduler.example:8786"
    monkeypatch.setenv(DASK_ADDRESS_ENV, "  ")  # blank: as if unset
    assert isinstance(runner.choose(), ThreadPoolTaskRunner)


@task
def _square(x: int) -> int:
    return x * x


def test_tasks_cannot_be_submitted_before_it_starts():
    with pytest.raises(RuntimeError, match="must be started"):
        ClusterOrThreadsTaskRunner().submit(_square, {"x": 2})
