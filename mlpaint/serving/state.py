"""What every route of a server process shares: the model it serves, its counters, the
feedback store and the rate limit. Built once by `create_app`, kept on `app.state`, and
handed to each route by FastAPI's dependency injection (`Served`)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from limits import RateLimitItem
from limits.strategies import MovingWindowRateLimiter

from mlpaint.feedback.store import FeedbackRecord, FeedbackStore
from mlpaint.serving.events import FeedbackAnnouncer
from mlpaint.serving.metrics import ServerMetrics
from mlpaint.serving.model import ModelHolder, ServedModel


@dataclass
class ServingState:
    bundle_uri: str
    holder: ModelHolder
    metrics: ServerMetrics | None  # None: /metrics is off and nothing is counted
    feedback: FeedbackStore | None  # None: /v1/feedback is off
    announcer: FeedbackAnnouncer | None
    limiter: MovingWindowRateLimiter
    rate: RateLimitItem
    rate_text: str  # as the operator wrote it, for the 429's message

    def served(self) -> ServedModel:
        """The model being served; 503 before one has loaded."""
        current = self.holder.current
        if current is None:
            raise HTTPException(503, "no model loaded yet")
        return current

    def count_answers(self, endpoint: str, answers: Iterable[tuple[int | None, str]]) -> None:
        if self.metrics:
            self.metrics.count_answers(endpoint, answers)

    def admit_feedback_from(self, client: str) -> None:
        """429, with when to try again, for a client over the feedback rate."""
        if not self.limiter.hit(self.rate, client):
            wait_s = self.limiter.get_window_stats(self.rate, client).reset_time - time.time()
            raise HTTPException(429, f"too many feedback posts from this address: at most "
                                     f"{self.rate_text}",
                                headers={"Retry-After": str(max(1, math.ceil(wait_s)))})

    def stored(self, record: FeedbackRecord) -> None:
        """A new record is told to Prefect and counted."""
        if self.announcer is not None:
            self.announcer.announce(record)
        if self.metrics:
            self.metrics.count_feedback(record.label, record.answered_digit,
                                        record.bundle_version)


async def serving_state(request: Request) -> ServingState:
    # `async`: FastAPI runs a plain `def` dependency on a worker thread, a thread hop per
    # request that costs more than the answer (see mlpaint.serving.routes.answers).
    return request.app.state.serving


#: A route's parameter for the process's ServingState.
Served = Annotated[ServingState, Depends(serving_state)]
