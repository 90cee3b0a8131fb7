"""The REST door: ``POST /predict`` (served ahead of FastAPI by ``service.predict``; its route here documents it),
health, ``/model``, ``/admin/reload`` and ``/metrics``. Routes stay thin:
they read the request into plain values, call the core (``service.core``) and shape the answer; failures are
``{"detail": ...}`` with the status from ``service.http.HTTP_STATUS``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import lifecycle, metrics
from service import predict as hot_path
from service.http import Admin, Authorized, State, door_route
from service.schemas import Error, Health, ModelCard, ModelRef, PredictResponse, Reloaded

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


@router.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=IMAGE_BODY)
async def predict(request: Request, state: State, _: Authorized,
                  top_k: Annotated[hot_path.TopK, Query()] = 5) -> Response:
    """Classify one image (raw body) or several (multipart file parts); probabilities per image."""
    body, headers = await hot_path.handle(state, request.scope, request.receive)
    return Response(body, headers={k.decode(): v.decode() for k, v in headers})


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
    lifecycle.reload_other_workers(state)
    spec = pipeline.model.spec
    return Reloaded(status="reloaded", model=ModelRef(name=spec.name, version=spec.version),
                    provider=pipeline.model.provider)


@router.get("/metrics", include_in_schema=False)
async def prometheus(state: State) -> Response:
    """Prometheus exposition."""
    if state.batcher is not None:
        metrics.QUEUE_DEPTH.set(state.batcher.depth)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
