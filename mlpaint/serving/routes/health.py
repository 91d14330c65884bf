"""Is the process alive, is a model loaded, which one; and its Prometheus counters."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from mlpaint.serving.schemas import ModelResponse, ReadyResponse, error_responses
from mlpaint.serving.state import Served

router = APIRouter()
metrics_router = APIRouter()


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyResponse, responses={
    503: {"model": ReadyResponse, "description": "no model loaded (yet, or it failed)"}})
def readyz(state: Served) -> JSONResponse:
    current = state.holder.current
    if current is None:
        return JSONResponse({"ready": False, "error": state.holder.last_error}, 503)
    return JSONResponse({"ready": True, "bundle_version": current.version,
                         "last_refresh_error": state.holder.last_error})


@router.get("/v1/model", response_model=ModelResponse, responses=error_responses(503))
def model_info(state: Served) -> ModelResponse:
    current = state.served()
    info = current.bundle.info
    return ModelResponse(
        model_name=info.model_name, model_version=info.model_version,
        bundle_version=info.version, alias="champion" if "@champion" in state.bundle_uri
        else None, algorithm=info.algorithm,
        feature_stage=current.model.feature_stage.value,
        metrics=info.metrics, data_fingerprint=info.data_fingerprint,
        trained_at=info.created_at, gallery_per_digit=int(info.gallery.get("per_digit", 0)),
        low_confidence_below=current.model.low_confidence_below)


@metrics_router.get("/metrics", include_in_schema=False)
def prometheus_metrics(state: Served) -> Response:
    return Response(state.metrics.exposition(), media_type=state.metrics.content_type)
