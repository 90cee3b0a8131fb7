"""The REST door: ``POST /predict``, health, ``/model``, ``/admin/reload`` and ``/metrics``. Routes stay thin:
they read the request into plain values, call the core (``service.core``) and shape the answer; failures are
``{"detail": ...}`` with the status from ``service.http.HTTP_STATUS``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service import metrics
from service.core import Classification, classify_images
from service.errors import EmptyBody, InvalidMultipart, NoImages, TooManyImages, UnsupportedMediaType
from service.http import Admin, Authorized, State, disconnected, door_route, read_body
from service.runtime import softmax
from service.schemas import Error, Health, ModelCard, ModelRef, PredictResponse, Reloaded
from service.settings import Settings

RAW_TYPES = ("application/octet-stream", "application/x-www-form-urlencoded")  # the latter: curl --data-binary

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
                    },
                    "required": ["files"],  # no file part is a 400 (NoImages)
                }
            },
        },
    }
}
ERRORS = {code: {"model": Error} for code in (400, 401, 408, 413, 415, 422, 429, 503, 504)}

router = APIRouter(route_class=door_route("detail", validation_status=422))


async def read_images(request: Request, settings: Settings) -> list[bytes]:
    """The image payloads of a request: a raw body, or the file parts of a multipart form, in order."""
    content_type = request.headers.get("content-type", "application/octet-stream")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "multipart/form-data" and not (media.startswith("image/") or media in RAW_TYPES):
        raise UnsupportedMediaType()
    body = await read_body(request, settings)
    if not body:
        raise EmptyBody()
    if media != "multipart/form-data":
        return [body]

    async def stream() -> AsyncIterator[bytes]:
        yield body

    # The parser stops at the core's image limit, so a form of many tiny parts is not parsed to the end.
    parser = MultiPartParser(
        request.headers, stream(), max_files=settings.max_batch_images, max_fields=100,
        max_part_size=settings.max_upload_bytes,
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        # Starlette signals the file-count limit only through this message.
        raise (TooManyImages() if "Too many files" in e.message else InvalidMultipart()) from e
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise NoImages()
        images = [await f.read() for f in files]
    finally:
        await form.close()
    if any(not data for data in images):
        raise EmptyBody("empty file part")
    return images


def prediction_response(classification: Classification, top_k: int, started: float) -> JSONResponse:
    model = classification.model
    spec = model.spec
    probs = softmax(classification.logits)  # (N, classes), float64
    k = min(top_k, len(spec.labels))
    orders = np.argsort(-probs, axis=1, kind="stable")[:, :k].tolist()  # one numpy call for the whole batch
    labels = spec.labels
    predictions = [
        {"probabilities": p, "top_k": [{"label": labels[i], "index": i, "probability": p[i]} for i in order]}
        for p, order in zip(probs.tolist(), orders, strict=True)
    ]
    body = {"model": {"name": spec.name, "version": spec.version}, "provider": model.provider,
            "predictions": predictions}
    headers = {
        "Server-Timing": classification.server_timing(started),
        "X-Model-Name": spec.name,
        "X-Model-Version": spec.version,
        "X-Inference-Provider": model.provider,
    }
    return JSONResponse(body, headers=headers)


@router.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=IMAGE_BODY)
async def predict(
    request: Request,
    state: State,
    _: Authorized,
    top_k: Annotated[int, Query(ge=1, le=1000, description="classes to list, capped at the class count")] = 5,
) -> Response:
    """Classify one image (raw body) or several (multipart file parts); probabilities per image."""
    started = time.perf_counter()
    state.require_ready()
    images = await read_images(request, state.settings)
    classification = await classify_images(state, images, disconnected(request))
    return prediction_response(classification, top_k, started)


@router.get("/health/live", response_model=Health)
async def live() -> Health:
    """Liveness: 200 while the process can answer."""
    return Health(status="alive")


@router.get("/health/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(state: State) -> Response:
    """Readiness: 200 once the model is loaded and warmed up; 503 with the reason otherwise."""
    if state.ready:
        return JSONResponse({"status": "ready", "detail": None})
    return JSONResponse({"status": state.status, "detail": state.reason}, status_code=503)


@router.get("/model", response_model=ModelCard, responses={503: {"model": Error}})
async def model_card(state: State, _: Authorized) -> ModelCard:
    """The served model: labels, input shape, preprocessing, provider, and its metadata."""
    pipeline = state.require_ready()
    spec, meta = pipeline.model.spec, pipeline.model.spec.metadata
    return ModelCard(
        name=spec.name, version=spec.version, labels=spec.labels, input_name=spec.input_name,
        input_shape=spec.input_shape, preprocessing=spec.preprocessing.to_metadata(),
        provider=pipeline.model.provider, arch=meta.get("arch"), val_accuracy=meta.get("val_accuracy"),
        created_at=meta.get("created_at"), metadata=meta,
    )


@router.post("/admin/reload", response_model=Reloaded, responses={401: {"model": Error}, 403: {"model": Error},
                                                                   409: {"model": Error}})
async def reload(state: State, _: Admin) -> Reloaded:
    """Reload the model from the configured path; the old one serves until the new one is warm."""
    pipeline = await state.reload()
    spec = pipeline.model.spec
    return Reloaded(status="reloaded", model=ModelRef(name=spec.name, version=spec.version),
                    provider=pipeline.model.provider)


@router.get("/metrics", include_in_schema=False)
async def prometheus(state: State) -> Response:
    """Prometheus exposition."""
    if state.batcher is not None:
        metrics.QUEUE_DEPTH.set(state.batcher.depth)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
