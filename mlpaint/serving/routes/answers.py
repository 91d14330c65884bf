"""Scores and exact explanations of drawn digits, and the gallery of explained test digits.

Scoring and explaining one digit take a millisecond or two of CPU. They run on the event loop
(`async def`), one request after another in each worker process: handing each to a thread,
as FastAPI does for plain `def`, made concurrent requests fight over the GIL, which cost more
than the work and stretched the tail latency (bench/serve.py). The largest unit of work is a
batch of 256 digits, tens of milliseconds."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query

from mlpaint.data.pins import N_CLASSES
from mlpaint.serving.drawings import pixels_of_all
from mlpaint.serving.model import ALL_LABELS, ServedModel, top_labels
from mlpaint.serving.schemas import (
    ExampleResponse,
    ExplainRequest,
    ExplainResponse,
    LabelExplanation,
    Prediction,
    PredictRequest,
    PredictResponse,
    Status,
    error_responses,
)
from mlpaint.serving.state import Served

router = APIRouter()


def _confidence(probabilities: np.ndarray, model: ServedModel) -> Status:
    """The status of `model`'s answer to a drawing that holds something."""
    return ("low_confidence" if probabilities.max() < model.model.low_confidence_below
            else "ok")


@router.post("/v1/predict", response_model=PredictResponse,
             responses=error_responses(400, 413, 503))
async def predict(request: PredictRequest, state: Served) -> PredictResponse:
    current = state.served()
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
    state.count_answers("predict", ((p.digit, p.status) for p in predictions))
    return PredictResponse(predictions=predictions)


@router.post("/v1/explain", response_model=ExplainResponse,
             responses=error_responses(400, 413, 503))
async def explain(request: ExplainRequest, state: Served) -> ExplainResponse:
    current = state.served()
    all_pixels, drawn = await pixels_of_all([request])
    pixels = all_pixels[0]
    info = current.bundle.info
    if not drawn[0]:
        state.count_answers("explain", [(None, "nothing_drawn")])
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
    state.count_answers("explain", [(int(probabilities.argmax()), status)])
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


@router.get("/v1/examples", response_model=ExampleResponse,
            responses=error_responses(404, 503))
def examples(digit: Annotated[int, Query(ge=0, le=N_CLASSES - 1)], state: Served,
             offset: Annotated[int, Query(ge=0)] = 0) -> ExampleResponse:
    current = state.served()
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
