"""The stack's Prefect automations: a run whose worker died is picked up again by a live
worker, with nobody watching.

A process worker killed outright (SIGKILL, a lost machine, the OOM killer) takes its flow run
processes with it, and nothing tells the server: the runs stay Running forever (the known
form of this is PrefectHQ/prefect#16746). Prefect's answer is flow run heartbeats plus two
automations, both restricted to runs tagged `mlpaint` (every deployment of prefect.yaml):

1. "crash silent runs": a running flow run that has sent a heartbeat and then nothing for
   `MLPAINT_ZOMBIE_SECONDS` (default 90: three missed beats at the stack's 30 s) is set
   Crashed;
2. "rerun crashed runs": a Crashed run that had sent a heartbeat (its flow code was running)
   is scheduled again (AwaitingRetry), so any live worker of the pool takes it. The rerun
   reuses every fit that finished (see flows/train.py) and ends the MLflow runs its dead
   attempt left open as KILLED; `flows.attempts` bounds the starts of one run, so a run
   that crashes every time ends Failed instead of looping.

Run by `infra/stack.sh up` (and `deploy`) against PREFECT_API_URL; running it again
replaces the two automations with the current definitions.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture

logger = logging.getLogger("mlpaint.infra.automations")

TAG = "mlpaint"
CRASH_SILENT_RUNS = "mlpaint: crash flow runs whose heartbeats stopped"
RERUN_CRASHED_RUNS = "mlpaint: rerun crashed flow runs"
FINAL_EVENTS = {f"prefect.flow-run.{state}" for state in
                ("Completed", "Failed", "Cancelled", "Crashed")}


def automations(silence: timedelta) -> list[Automation]:
    ours = {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"}
    return [
        Automation(
            name=CRASH_SILENT_RUNS,
            description="A flow run that sent a heartbeat and then nothing (and did not end) "
                        f"for {silence.total_seconds():.0f} s lost its process: Crashed.",
            trigger=EventTrigger(
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related=ours,
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=silence,
            ),
            actions=[ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {silence.total_seconds():.0f} s: the process "
                        "running this flow run died")],
        ),
        Automation(
            name=RERUN_CRASHED_RUNS,
            description="A flow run that crashed after it started beating is scheduled "
                        "again, for any live worker.",
            # `after` a heartbeat: only a run whose flow code was running is rerun. One that
            # crashes before its code starts (a broken checkout, say) never beats, so it is
            # not rescheduled into the same crash forever. The window outlasts any run.
            trigger=EventTrigger(
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related=ours,
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.Crashed"},
                for_each={"prefect.resource.id"},
                posture=Posture.Reactive,
                threshold=1,
                within=timedelta(days=7),
            ),
            # Crashed is a final state, which only a forced transition leaves.
            actions=[ChangeFlowRunState(
                state=StateType.SCHEDULED, name="AwaitingRetry", force=True,
                message="rescheduled by mlpaint after its previous attempt crashed")],
        ),
    ]


def install(silence: timedelta) -> list[str]:
    """Create the automations, replacing any of the same names; their names."""
    wanted = automations(silence)
    with get_client(sync_client=True) as client:
        for automation in wanted:
            for existing in client.read_automations_by_name(automation.name):
                client.delete_automation(existing.id)
            automation.create()
            logger.info("automation %r installed", automation.name)
    return [a.name for a in wanted]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s automations: %(message)s",
                        datefmt="%H:%M:%S")
    install(timedelta(seconds=float(os.environ.get("MLPAINT_ZOMBIE_SECONDS", "90"))))
