"""The MLPaint ASGI app: the REST API and the drawing page.

Every input is validated by pydantic against the contract in mlpaint.serving.schemas (visible
on /docs); anything wrong with a request is a 4xx saying what to fix. Drawings become pixels in
mlpaint.serving.drawings; the body limit is mlpaint.serving.body_limit.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from limits import parse as parse_rate
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mlpaint.data.catalog import N_CLASSES
from mlpaint.feedback import FeedbackRecord, FeedbackStore
from mlpaint.serving.body_limit import BodySizeLimit
from mlpaint.serving.drawings import (
    digit_of_drawing_soon,
    drawing_bytes,
    pixels_of,
    pixels_of_all,
)
from mlpaint.serving.events import FeedbackAnnouncer
from mlpaint.serving.metrics import RequestMetrics, ServerMetrics
from mlpaint.serving.model import (
    ALL_LABELS,
    ModelHolder,
    ServedModel,
    exempt_from_collection,
    top_labels,
)
from mlpaint.serving.schemas import (
    MAX_BODY_BYTES,
    ExampleResponse,
    ExplainRequest,
    ExplainResponse,
    FeedbackRequest,
    FeedbackResponse,
    LabelExplanation,
    ModelResponse,
    Prediction,
    PredictRequest,
    PredictResponse,
    ReadyResponse,
    Status,
    error_responses,
)
from mlpaint.serving.security import SecurityHeaders

logger = logging.getLogger(__name__)

# A person labels a drawing every few seconds at most; a client far above that is a script.
DEFAULT_FEEDBACK_RATE = "30/minute"
# Each server process counts alone: with N workers a client may post N times the rate.
# `redis://host:port` shares one count among every worker and server.
DEFAULT_RATE_LIMIT_STORAGE = "memory://"


def _confidence(probabilities: np.ndarray, model: ServedModel) -> Status:
    """The status of `model`'s answer to a drawing that holds something."""
    return ("low_confidence" if probabilities.max() < model.model.low_confidence_below
            else "ok")


def create_app(bundle_uri: str, *, cache_dir: Path | None = None,
               watch_interval_s: float = 5.0, feedback_store: str | None = None,
               feedback_rate: str = DEFAULT_FEEDBACK_RATE,
               rate_limit_storage: str = DEFAULT_RATE_LIMIT_STORAGE, with_metrics: bool = True
               ) -> FastAPI:
    """The app. `feedback_store` is where `/v1/feedback` appends (None: the endpoint answers
    404); `feedback_rate` is how many posts one client address may make, as `limits` writes
    it ("20/minute"), counted in `rate_limit_storage` (a `limits` storage URI: `memory://`
    counts in this process alone, `redis://host:port` across every process that uses it);
    `with_metrics` serves Prometheus' `/metrics` (mlpaint.serving.metrics), else nothing is
    counted and it answers 404."""
    metrics = ServerMetrics() if with_metrics else None
    holder = ModelHolder(bundle_uri, cache_dir=cache_dir)
    if metrics:
        holder.on_serving = lambda served: metrics.now_serving(
            served.version, served.bundle.info.model_version)
        holder.on_failed_reload = lambda _: metrics.count_reload(swapped=False)
    feedback = FeedbackStore.at(feedback_store) if feedback_store else None
    rate = parse_rate(feedback_rate)
    limiter = MovingWindowRateLimiter(storage_from_string(rate_limit_storage))
    announcer = FeedbackAnnouncer(feedback.describe()) if feedback else None

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        holder.load_initial()
        if announcer is not None:
            announcer.start()
        exempt_from_collection()  # all that startup imported and loaded
        if watch_interval_s > 0:
            holder.watch(watch_interval_s)
        yield
        holder.stop()

    app = FastAPI(title="MLPaint", version="1", lifespan=lifespan,
                  description="Scores and exact per-pixel explanations of handwritten digits.")
    app.state.holder = holder
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each bad input back, and a NaN cannot be written as JSON
        # (it would turn a 422 into a 500): say where and what, not the value.
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""),
             "type": error.get("type", "")} for error in exc.errors()]})

    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(SecurityHeaders, policy_exempt=frozenset(
        path for path in (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
        if path))
    if metrics:
        app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: times every answer
    # The page's script and styles, files of their own so the policy can forbid inline code.
    app.mount("/static", StaticFiles(packages=[("mlpaint.serving", "static")]), name="static")

    def served() -> ServedModel:
        current = holder.current
        if current is None:
            raise HTTPException(503, "no model loaded yet")
        return current

    if metrics:
        @app.get("/metrics", include_in_schema=False)
        def prometheus_metrics() -> Response:
            return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyResponse, responses={
        503: {"model": ReadyResponse, "description": "no model loaded (yet, or it failed)"}})
    def readyz() -> JSONResponse:
        current = holder.current
        if current is None:
            return JSONResponse({"ready": False, "error": holder.last_error}, 503)
        return JSONResponse({"ready": True, "bundle_version": current.version,
                             "last_refresh_error": holder.last_error})

    @app.get("/v1/model", response_model=ModelResponse, responses=error_responses(503))
    def model_info() -> ModelResponse:
        current = served()
        info = current.bundle.info
        return ModelResponse(
            model_name=info.model_name, model_version=info.model_version,
            bundle_version=info.version, alias="champion" if "@champion" in bundle_uri
            else None, algorithm=info.algorithm,
            feature_stage=current.model.feature_stage.value,
            metrics=info.metrics, data_fingerprint=info.data_fingerprint,
            trained_at=info.created_at, gallery_per_digit=int(info.gallery.get("per_digit", 0)),
            low_confidence_below=current.model.low_confidence_below)

    # Scoring and explaining one digit take a millisecond or two of CPU. They run on the event
    # loop (`async def`), one request after another in each worker process: handing each to a
    # thread, as FastAPI does for plain `def`, made concurrent requests fight over the GIL,
    # which cost more than the work and stretched the tail latency (bench/serve.py). The
    # largest unit of work is a batch of 256 digits, tens of milliseconds.
    @app.post("/v1/predict", response_model=PredictResponse,
              responses=error_responses(400, 413, 503))
    async def predict(request: PredictRequest) -> PredictResponse:
        current = served()
        items = request.batch if request.batch is not None else [request]
        pixels, drawn = await pixels_of_all(items)
        raw, probabilities = current.score(current.features(pixels))
        info = current.bundle.info
        predictions = []
        for r, p, was_drawn in zip(raw, probabilities, drawn, strict=True):
            if was_drawn:
                predictions.append(Prediction(
                    status=_confidence(p, current), digit=int(p.argmax()),
                    candidates=top_labels(p, 2),
                    probabilities=p.tolist(), raw_scores=r.tolist(),
                    model_version=info.model_version, bundle_version=info.version))
            else:
                predictions.append(Prediction(
                    status="nothing_drawn", digit=None, candidates=[], probabilities=None,
                    raw_scores=None, model_version=info.model_version,
                    bundle_version=info.version))
        if metrics:
            metrics.count_answers("predict", ((p.digit, p.status) for p in predictions))
        return PredictResponse(predictions=predictions)

    @app.post("/v1/explain", response_model=ExplainResponse,
              responses=error_responses(400, 413, 503))
    async def explain(request: ExplainRequest) -> ExplainResponse:
        current = served()
        all_pixels, drawn = await pixels_of_all([request])
        pixels = all_pixels[0]
        info = current.bundle.info
        if not drawn[0]:
            if metrics:
                metrics.count_answers("explain", [(None, "nothing_drawn")])
            return ExplainResponse(
                status="nothing_drawn", digit=None, candidates=[], probabilities=None,
                image=pixels.tolist(), features=[], explanations=[],
                model_version=info.model_version, bundle_version=info.version)
        features = current.features(pixels[None, :])[0]  # once: scores and contributions
        raw, probabilities = current.score(features[None, :])
        raw, probabilities = raw[0], probabilities[0]
        if request.labels == "all":
            labels = ALL_LABELS
        elif request.labels is None:
            labels = top_labels(probabilities, 3)
        else:
            labels = list(dict.fromkeys(request.labels))
        contrib = current.explain(features, labels)
        status = _confidence(probabilities, current)
        if metrics:
            metrics.count_answers("explain", [(int(probabilities.argmax()), status)])
        return ExplainResponse(
            status=status, digit=int(probabilities.argmax()),
            candidates=top_labels(probabilities, 2), probabilities=probabilities.tolist(),
            image=pixels.tolist(), features=features.tolist(),
            explanations=[LabelExplanation(label=label, probability=float(probabilities[label]),
                                           raw_score=float(raw[label]),
                                           bias=float(contrib[i, -1]),
                                           contributions=contrib[i, :-1].tolist())
                          for i, label in enumerate(labels)],
            model_version=info.model_version, bundle_version=info.version)

    @app.get("/v1/examples", response_model=ExampleResponse, responses=error_responses(404, 503))
    def examples(digit: Annotated[int, Query(ge=0, le=N_CLASSES - 1)],
                 offset: Annotated[int, Query(ge=0)] = 0) -> ExampleResponse:
        current = served()
        count = current.gallery_count(digit)
        if offset >= count:
            raise HTTPException(404, f"offset {offset} is past the gallery: digit {digit} has "
                                     f"{count} examples (offsets 0..{count - 1})")
        row = current.gallery_row(digit, offset)
        g = current.gallery
        contributions = g["contributions"][row]
        return ExampleResponse(
            digit=digit, offset=offset, count=count, row_key=str(g["row_key"][row]),
            predicted=int(g["raw_scores"][row].argmax()), image=g["pixels"][row].tolist(),
            features=g["features"][row].tolist(),
            probabilities=g["probabilities"][row].tolist(),
            raw_scores=g["raw_scores"][row].tolist(),
            contributions=contributions[:, :-1].tolist(), bias=contributions[:, -1].tolist())

    @app.post("/v1/feedback", response_model=FeedbackResponse, status_code=201, responses={
        200: {"model": FeedbackResponse, "description": "already stored"},
        **error_responses(400, 404, 413, 429, 503)})
    async def post_feedback(body: FeedbackRequest, request: Request,
                            response: Response) -> FeedbackResponse:
        if feedback is None:
            raise HTTPException(404, "feedback is off on this server (--feedback-store off)")
        client = request.client.host if request.client else "unknown"
        if not limiter.hit(rate, client):
            wait_s = limiter.get_window_stats(rate, client).reset_time - time.time()
            raise HTTPException(429, f"too many feedback posts from this address: at most "
                                     f"{feedback_rate}",
                                headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
        current = holder.current
        media_type = drawing = None
        if body.image is not None:  # kept as received, so decoded here, not in pixels_of
            media_type, drawing = drawing_bytes(body.image)
            pixels, drawn = await digit_of_drawing_soon(drawing)
        else:
            pixels, drawn = pixels_of(body)
        if not drawn:
            # 400, like an undecodable image: the body keeps the schema (422 is for bodies
            # that break it), but its drawing cannot be used.
            raise HTTPException(400, "nothing drawn: draw a digit before labelling it")
        answered_by = body.bundle_version or (current.version if current else None)
        model_version = (current.bundle.info.model_version
                         if current and current.version == answered_by else None)
        record = FeedbackRecord.new(
            label=body.label, pixels=pixels.reshape(-1), drawing=drawing,
            drawing_media_type=media_type, answered_digit=body.digit,
            bundle_version=answered_by, model_version=model_version)
        # Writing to the store (a file and its fsync, or a PUT to S3): a worker thread.
        created = await run_in_threadpool(feedback.add, record)
        if created:
            announcer.announce(record)
            if metrics:
                metrics.count_feedback(record.label, record.answered_digit,
                                       record.bundle_version)
        else:
            response.status_code = 200
        return FeedbackResponse(id=record.id, created=created, label=record.label)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("mlpaint.serving").joinpath("static/index.html").read_text()

    return app


class ServeSettings(BaseSettings):
    """What each server process needs to build the app. `mlpaint serve` writes these to the
    environment, because with several workers uvicorn starts fresh processes that import
    the app by name rather than receive the object."""

    model_config = SettingsConfigDict(env_prefix="MLPAINT_SERVE_", extra="ignore")
    bundle: str
    cache_dir: Path | None = None
    watch_seconds: float = Field(5.0, ge=0)
    feedback_store: str | None = None  # None: feedback off
    feedback_rate: str = DEFAULT_FEEDBACK_RATE
    rate_limit_storage: str = DEFAULT_RATE_LIMIT_STORAGE
    metrics: bool = True

    def to_environment(self) -> dict[str, str]:
        return {f"MLPAINT_SERVE_{name.upper()}": str(value)
                for name, value in self.model_dump().items() if value is not None}


def app_from_environment() -> FastAPI:
    """The app factory uvicorn calls in each worker process."""
    settings = ServeSettings()
    return create_app(settings.bundle, cache_dir=settings.cache_dir,
                      watch_interval_s=settings.watch_seconds,
                      feedback_store=settings.feedback_store,
                      feedback_rate=settings.feedback_rate,
                      rate_limit_storage=settings.rate_limit_storage,
                      with_metrics=settings.metrics)

