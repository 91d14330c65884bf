"""Telling Prefect that feedback arrived, without ever making a request wait for it.

Each new record emits `mlpaint.feedback.received` (the label and versions, never the
drawing), which a deployment trigger counts to start retraining after N new records
(prefect.yaml). Only when a Prefect API is configured (PREFECT_API_URL, or the active
profile): without one, Prefect would start a temporary server inside the serving process.

Requests only put the record's summary on a bounded queue; one background thread hands them
to Prefect's events worker, which sends them from a thread of its own. Starting that worker
(it connects to the API) can take seconds, and when the API is down its client retries its
connection a bounded number of times (PrefectEventsClient's reconnection attempts), then logs
the failure and drops the event: none of it happens on the request path. The record itself is
already stored, so a missed event delays a retraining; it loses no data.
"""

from __future__ import annotations

import logging
import queue
import threading

from mlpaint.feedback.store import FeedbackRecord

logger = logging.getLogger(__name__)

FEEDBACK_RECEIVED = "mlpaint.feedback.received"
RESOURCE_PREFIX = "mlpaint.feedback"
QUEUE_SIZE = 10_000  # events waiting for Prefect; beyond it new ones are dropped and logged


def prefect_api_configured() -> bool:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url is not None


class FeedbackAnnouncer:
    def __init__(self, store_uri: str) -> None:
        self.store_uri = store_uri
        self.enabled = False
        self._queue: queue.Queue[FeedbackRecord] = queue.Queue(QUEUE_SIZE)
        self._dropped = 0

    def start(self) -> None:
        """Decide once, at startup, whether to announce, and start the sending thread."""
        try:
            self.enabled = prefect_api_configured()
        except Exception:
            logger.warning("Prefect settings unreadable; feedback will not trigger runs",
                           exc_info=True)
            self.enabled = False
        if not self.enabled:
            logger.info("no Prefect API configured: feedback events are off")
            return
        threading.Thread(target=self._send_forever, name="feedback-events",
                         daemon=True).start()
        logger.info("feedback events go to Prefect as %s", FEEDBACK_RECEIVED)

    def announce(self, record: FeedbackRecord) -> None:
        """Queue the event; never blocks."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._dropped += 1
            logger.warning("feedback event for %s dropped: %d events wait for Prefect "
                           "(%d dropped so far)", record.id, QUEUE_SIZE, self._dropped)

    def _send_forever(self) -> None:
        from prefect.events import emit_event

        while True:
            record = self._queue.get()
            try:
                emit_event(
                    event=FEEDBACK_RECEIVED,
                    resource={"prefect.resource.id": f"{RESOURCE_PREFIX}.{record.id}",
                              "prefect.resource.name": f"feedback {record.id[:8]}",
                              "mlpaint.feedback.store": self.store_uri},
                    payload={"label": record.label, "answered_digit": record.answered_digit,
                             "corrected": record.corrected,
                             "bundle_version": record.bundle_version})
            except Exception:  # serving never fails because Prefect is unreachable
                logger.warning("could not send the feedback event for %s", record.id,
                               exc_info=True)
