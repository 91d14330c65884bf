"""Telling Prefect that feedback arrived, without ever making a request wait for it.

Each new record emits `mlpaint.feedback.received` (the label and versions, never the
drawing), which a deployment trigger counts to start retraining after N new records
(prefect.yaml). Prefect's events worker sends from its own thread: `announce` only queues.
When the API is down the worker retries its connection a bounded number of times
(PrefectEventsClient's reconnection attempts), then logs the failure and drops the event;
the record itself is already stored, so a missed event delays a retraining, it loses no data.
"""

from __future__ import annotations

import logging

from mlpaint.feedback import FeedbackRecord

logger = logging.getLogger(__name__)

FEEDBACK_RECEIVED = "mlpaint.feedback.received"
RESOURCE_PREFIX = "mlpaint.feedback"


class FeedbackAnnouncer:
    def __init__(self, store_uri: str) -> None:
        self.store_uri = store_uri
        self.enabled = False

    def start(self) -> None:
        """Decide once, at startup, whether a Prefect API is configured (PREFECT_API_URL or
        the active profile); without one, announcing is a no-op."""
        try:
            from prefect.events.worker import should_emit_events

            self.enabled = should_emit_events()
        except Exception:
            logger.warning("Prefect events unavailable; feedback will not trigger runs",
                           exc_info=True)
            self.enabled = False
        if self.enabled:
            logger.info("feedback events go to Prefect as %s", FEEDBACK_RECEIVED)

    def announce(self, record: FeedbackRecord) -> None:
        if not self.enabled:
            return
        try:
            from prefect.events import emit_event

            emit_event(
                event=FEEDBACK_RECEIVED,
                resource={"prefect.resource.id": f"{RESOURCE_PREFIX}.{record.id}",
                          "prefect.resource.name": f"feedback {record.id[:8]}",
                          "mlpaint.feedback.store": self.store_uri},
                payload={"label": record.label, "answered_digit": record.answered_digit,
                         "corrected": record.corrected,
                         "bundle_version": record.bundle_version})
        except Exception:  # serving never fails because Prefect is unreachable
            logger.warning("could not queue the feedback event for %s", record.id,
                           exc_info=True)
