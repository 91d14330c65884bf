"""Where a fit's progress (mlpaint.training.progress) is shown while it trains: a log line at
every tenth of its rounds, a progress artifact on its task run (the Prefect UI shows a bar on
the flow run's Artifacts tab), and a terminal bar when stderr is one (the CLI). And what
stops a run's fits when the run ends early, and a wait for them that a signal can end."""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from mlpaint.training.progress import AtMostEvery, EveryTenth, FitProgress, ProgressWatcher

# Each update of a progress artifact is a request to the Prefect API.
ARTIFACT_UPDATE_SECONDS = 2.0
# The flow runs of this process that ended early: their fits stop at their next round.
_ENDED_FLOW_RUNS: set[str] = set()
# How often a wait for fits wakes. The kernel may hand a process's SIGINT or SIGTERM to any
# of its threads; when a fit's thread takes it, Python runs the handler (KeyboardInterrupt,
# Prefect's TerminationSignal) only once the main thread runs again, which a wait without
# a timeout never does while the fits train.
WAKE_SECONDS = 0.5

R = TypeVar("R")


class _LogLine:
    def __init__(self, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.logger = logger

    def __call__(self, progress: FitProgress) -> None:
        self.logger.info("%s", progress.describe())


class _ProgressArtifact:
    """A progress artifact created at the fit's first report and updated after. A failed
    request is logged once and the artifact left as it was: the fit is worth more than its
    progress bar."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.logger = logger
        self.artifact_id = None
        self.failed = False

    def __call__(self, progress: FitProgress) -> None:
        if self.failed:
            return
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(100 * progress.fraction,
                                                            description=progress.describe())
            else:
                update_progress_artifact(self.artifact_id, 100 * progress.fraction,
                                         description=progress.describe())
        except Exception as exc:  # any failure of the API: see the class docstring
            self.failed = True
            self.logger.warning("%s: its progress artifact is no longer updated (%s: %s)",
                                progress.fit, type(exc).__name__, exc)


class _TerminalBar:
    def __init__(self) -> None:
        self.bar = None

    def __call__(self, progress: FitProgress) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=progress.rounds_total, desc=progress.fit, unit="round",
                            leave=False, file=sys.stderr)
        self.bar.update(progress.rounds_done - self.bar.n)
        if progress.latest is not None:
            self.bar.set_postfix_str(f"accuracy {progress.latest.accuracy:.4f}", refresh=False)
        if progress.rounds_done >= progress.rounds_total:
            self.bar.close()


def fit_watchers() -> list[ProgressWatcher]:
    """The watchers of a fit trained in the current task run."""
    logger = get_run_logger()
    watchers: list[ProgressWatcher] = [
        EveryTenth(_LogLine(logger)),
        AtMostEvery(_ProgressArtifact(logger), ARTIFACT_UPDATE_SECONDS)]
    if sys.stderr.isatty():
        watchers.append(_TerminalBar())
    return watchers


def fit_should_stop() -> Callable[[], bool]:
    """For a fit trained in the current task run: true once its flow run has ended early
    (`fits_stop_if_the_run_ends_early`)."""
    run_id = flow_run.get_id()
    return lambda: run_id in _ENDED_FLOW_RUNS


@contextlib.contextmanager
def fits_stop_if_the_run_ends_early() -> Iterator[None]:
    """Around a flow's wait for its fits: whatever ends the wait (a SIGTERM, which Prefect
    raises as TerminationSignal and by which a cancellation from the UI reaches a run's
    process; Ctrl-C; a fit that failed) stops the run's other fits at their next round.
    Python cannot interrupt a thread: without this the task runner's threads train every
    remaining round, minutes to an hour, before the process can exit."""
    try:
        yield
    except BaseException:
        _ENDED_FLOW_RUNS.add(flow_run.get_id())
        raise


def as_completed_waking(futures: Sequence[PrefectFuture[R]]) -> Iterator[PrefectFuture[R]]:
    """Each future as it completes, like `prefect.futures.as_completed`, but waking every
    WAKE_SECONDS, so that Ctrl-C or SIGTERM ends the wait at once whichever thread the
    kernel gave the signal to (prefect's waits on an event without a timeout)."""
    finished: queue.SimpleQueue[PrefectFuture[R]] = queue.SimpleQueue()
    unique = list(dict.fromkeys(futures))
    for future in unique:
        future.add_done_callback(finished.put)
    for _ in unique:
        done = None
        while done is None:
            with contextlib.suppress(queue.Empty):
                done = finished.get(timeout=WAKE_SECONDS)
        yield done
