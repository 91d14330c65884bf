"""The MLPaint ASGI app: the REST API and the drawing page.

Every input is validated by pydantic against the contract in mlpaint.serving.schemas (visible
on /docs); anything wrong with a request is a 4xx saying what to fix. The routes are in
mlpaint.serving.routes, one router per concern, sharing the process's ServingState
(mlpaint.serving.state); drawings become pixels in mlpaint.serving.drawings; the body limit
is mlpaint.serving.body_limit.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from limits import parse as parse_rate
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mlpaint.feedback.store import FeedbackStore
from mlpaint.serving.body_limit import BodySizeLimit
from mlpaint.serving.events import FeedbackAnnouncer
from mlpaint.serving.metrics import RequestMetrics, ServerMetrics
from mlpaint.serving.model import ModelHolder, exempt_from_collection
from mlpaint.serving.routes import answers, health, page
from mlpaint.serving.routes import feedback as feedback_routes
from mlpaint.serving.schemas import MAX_BODY_BYTES
from mlpaint.serving.security import SecurityHeaders
from mlpaint.serving.state import ServingState

logger = logging.getLogger(__name__)

# A person labels a drawing every few seconds at most; a client far above that is a script.
DEFAULT_FEEDBACK_RATE = "30/minute"
# Each server process counts alone: with N workers a client may post N times the rate.
# `redis://host:port` shares one count among every worker and server.
DEFAULT_RATE_LIMIT_STORAGE = "memory://"


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
    state = ServingState(
        bundle_uri=bundle_uri, holder=holder, metrics=metrics, feedback=feedback,
        announcer=FeedbackAnnouncer(feedback.describe()) if feedback else None,
        limiter=MovingWindowRateLimiter(storage_from_string(rate_limit_storage)),
        rate=parse_rate(feedback_rate), rate_text=feedback_rate)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        holder.load_initial()
        if state.announcer is not None:
            state.announcer.start()
        exempt_from_collection()  # all that startup imported and loaded
        if watch_interval_s > 0:
            holder.watch(watch_interval_s)
        yield
        holder.stop()

    app = FastAPI(title="MLPaint", version="1", lifespan=lifespan,
                  description="Scores and exact per-pixel explanations of handwritten digits.")
    app.state.serving = state
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(SecurityHeaders, policy_exempt=frozenset(
        path for path in (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
        if path))
    if metrics:
        app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: times every answer
        app.include_router(health.metrics_router)
    # The page's script and styles, files of their own so the policy can forbid inline code.
    app.mount("/static", StaticFiles(packages=[("mlpaint.serving", "static")]), name="static")
    for router in (health.router, answers.router, feedback_routes.router, page.router):
        app.include_router(router)
    return app


async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes each bad input back, and a NaN cannot be written as JSON (it
    # would turn a 422 into a 500): say where and what, not the value.
    return JSONResponse(status_code=422, content={"detail": [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""),
         "type": error.get("type", "")} for error in exc.errors()]})


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

