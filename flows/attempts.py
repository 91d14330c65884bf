"""How many times one flow run may start.

On the stack a flow run starts again without anyone asking: a failed run retries (the
deployments' `PREFECT_FLOW_DEFAULT_RETRIES`), and a run whose process died is marked Crashed
and scheduled again by the automations of `infra/automations.py`. A run that dies the same way
every time (a machine too small for it, say) would be rescheduled forever; this bound ends it
as Failed, with the reason, which no automation restarts."""

from __future__ import annotations

from prefect.logging import get_run_logger
from prefect.runtime import flow_run

MAX_FLOW_RUN_STARTS = 4


class AttemptsExhaustedError(RuntimeError):
    """This flow run has started more often than `MAX_FLOW_RUN_STARTS`."""


def check_attempts() -> int:
    """The number of times this flow run has started (1 the first time); raises once it has
    started more than `MAX_FLOW_RUN_STARTS` times. Called first thing in a flow."""
    starts = flow_run.run_count or 1
    if starts > MAX_FLOW_RUN_STARTS:
        raise AttemptsExhaustedError(
            f"flow run {flow_run.id} has started {starts} times (at most "
            f"{MAX_FLOW_RUN_STARTS}); each earlier attempt crashed or failed, so it is given "
            "up: read the earlier attempts' logs, fix the cause, and start a new run")
    if starts > 1:
        get_run_logger().warning("flow run %s: attempt %d (earlier attempts crashed or "
                                 "failed); finished work is reused", flow_run.id, starts)
    return starts
