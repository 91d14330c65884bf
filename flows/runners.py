"""Where a training flow run's tasks run, chosen when the run starts: a deployment's runs
(weekly, triggered, or from the UI) reach a Dask cluster through a setting, the job
variable `env: {MLPAINT_DASK_ADDRESS: tcp://scheduler:8786}`, with the same entrypoint and
code as a run on the worker's own cores. (`mlpaint train --dask-address` chooses its runner
itself.)"""

from __future__ import annotations

import os
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

DASK_ADDRESS_ENV = "MLPAINT_DASK_ADDRESS"


def dask_address() -> str | None:
    """The Dask scheduler `MLPAINT_DASK_ADDRESS` names now, or None."""
    return os.environ.get(DASK_ADDRESS_ENV, "").strip() or None


class ClusterOrThreadsTaskRunner(TaskRunner):
    """Prefect's Dask task runner on the scheduler `MLPAINT_DASK_ADDRESS` names when the flow
    run starts, else a thread pool of `max_workers` on this machine. Reading the setting at
    the start rather than at import lets one deployment run on either, by its job
    variables."""

    def __init__(self, max_workers: int | None = None) -> None:
        super().__init__()
        self.max_workers = max_workers
        self.chosen: TaskRunner | None = None

    def duplicate(self) -> ClusterOrThreadsTaskRunner:
        return type(self)(self.max_workers)

    def choose(self) -> TaskRunner:
        """The runner the setting names now (not started)."""
        if address := dask_address():
            from prefect_dask import DaskTaskRunner

            self.logger.info("tasks run on the Dask scheduler at %s (%s)", address,
                             DASK_ADDRESS_ENV)
            return DaskTaskRunner(address=address)
        return ThreadPoolTaskRunner(max_workers=self.max_workers)

    def __enter__(self) -> ClusterOrThreadsTaskRunner:
        super().__enter__()
        chosen = self.choose()
        chosen.__enter__()
        self.chosen = chosen
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        try:
            if self.chosen is not None:
                self.chosen.__exit__(exc_type, exc_value, traceback)
        finally:
            self.chosen = None
            super().__exit__(exc_type, exc_value, traceback)

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        if self.chosen is None:
            raise RuntimeError("the task runner must be started before tasks are submitted")
        return self.chosen.submit(task, parameters, wait_for, dependencies)
