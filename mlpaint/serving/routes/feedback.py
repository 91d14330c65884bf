"""POST /v1/feedback: a person's label for a drawing, appended to the feedback store."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool

from mlpaint.feedback.store import FeedbackRecord
from mlpaint.serving.drawings import digit_of_drawing_soon, drawing_bytes, pixels_of
from mlpaint.serving.schemas import FeedbackRequest, FeedbackResponse, error_responses
from mlpaint.serving.state import Served

router = APIRouter()


@router.post("/v1/feedback", response_model=FeedbackResponse, status_code=201, responses={
    200: {"model": FeedbackResponse, "description": "already stored"},
    **error_responses(400, 404, 413, 429, 503)})
async def post_feedback(body: FeedbackRequest, request: Request, response: Response,
                        state: Served) -> FeedbackResponse:
    if state.feedback is None:
        raise HTTPException(404, "feedback is off on this server (--feedback-store off)")
    state.admit_feedback_from(request.client.host if request.client else "unknown")
    current = state.holder.current
    media_type = drawing = None
    if body.image is not None:  # kept as received, so decoded here, not in pixels_of
        media_type, drawing = drawing_bytes(body.image)
        pixels, drawn = await digit_of_drawing_soon(drawing)
    else:
        pixels, drawn = pixels_of(body)
    if not drawn:
        # 400, like an undecodable image: the body keeps the schema (422 is for bodies that
        # break it), but its drawing cannot be used.
        raise HTTPException(400, "nothing drawn: draw a digit before labelling it")
    answered_by = body.bundle_version or (current.version if current else None)
    model_version = (current.bundle.info.model_version
                     if current and current.version == answered_by else None)
    record = FeedbackRecord.new(
        label=body.label, pixels=pixels.reshape(-1), drawing=drawing,
        drawing_media_type=media_type, answered_digit=body.digit,
        bundle_version=answered_by, model_version=model_version)
    # Writing to the store (a file and its fsync, or a PUT to S3): a worker thread.
    created = await run_in_threadpool(state.feedback.add, record)
    if created:
        state.stored(record)
    else:
        response.status_code = 200
    return FeedbackResponse(id=record.id, created=created, label=record.label)
