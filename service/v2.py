"""The Open Inference Protocol (KServe V2) over HTTP/REST, with Triton's binary tensor data extension, so
Triton's and KServe's clients and tools work against this service.

With Triton's extensions its clients call: classification (``class_count``), the model repository index, model
configuration and statistics.

Another door into ``service.core``, not a second implementation: FP32 (or UINT8) tensors go through
``classify_tensors``, BYTES tensors of encoded images through ``classify_images`` (decoded and preprocessed exactly
as for ``/predict``), under the same limits, micro-batcher, deadlines and API keys (with keys set, everything but
health needs one). The tensors and schemas are ``service.protocol``'s; failures are ``{"error": ...}``, 400 where
FastAPI would say 422, as the protocol asks.
"""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Body, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import StrictBool
from starlette.routing import Match

from service import metrics
from service.core import Pipeline, ServiceState, classify_images, classify_tensors
from service.errors import UnknownModel
from service.http import Authorized, State, disconnected, door_route, read_body
from service.protocol import (
    EXTENSIONS,
    HEADER_LENGTH,
    SERVER_NAME,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    V2Error,
    encode_response,
    model_config_of,
    model_metadata_of,
    model_statistics_of,
    parse_header,
    read_input,
    repository_index_of,
    requested_outputs,
    split_body,
)


async def served_model(state: State, _: Authorized, name: str) -> Pipeline:
    """The served model, if it is the one the path names. The key is checked first, so that without one
    a client cannot tell which model names exist."""
    serving = state.require_ready()
    if name != serving.model.spec.name:
        raise UnknownModel(f"unknown model {name!r}")
    return serving


Served = Annotated[Pipeline, Depends(served_model)]


async def served_version(serving: Served, name: str, version: str) -> None:
    """The /versions/{version} forms: the version must be the one served (FastAPI runs served_model once)."""
    if version != serving.model.spec.version:
        raise UnknownModel(f"unknown version {version!r} of model {name!r}")


VERSIONED = [Depends(served_version)]

ERRORS = {code: {"model": V2Error} for code in (400, 401, 404, 408, 413, 415, 429, 503, 504)}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "An inference request (JSON); with binary tensor data, the JSON header then the tensors' "
                       f"bytes, and {HEADER_LENGTH} giving the header's length.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe V2)"], responses=ERRORS,
                   route_class=door_route("error", validation_status=400))


@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request, _: Authorized) -> ServerMetadata:
    """Server metadata: name, version and the protocol extensions it speaks."""
    return ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", response_model=ServerLive)
async def server_live() -> ServerLive:
    """Liveness: 200 while the process can answer."""
    return ServerLive(live=True)


@router.get("/health/ready", response_model=ServerReady, responses={503: {"model": ServerReady}})
async def server_ready(state: State) -> Response:
    """Readiness: 200 once the model is loaded and warmed up; 503 while loading, after a failed load, draining."""
    return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)


@router.post("/repository/index")
async def repository_index(state: State, _: Authorized, ready: Annotated[StrictBool, Body(embed=True)] = False
                           ) -> list[dict[str, str]]:
    """Triton's model repository index: the one model, its version and state (READY once it serves)."""
    spec = state.serving.model.spec if state.serving else None
    return repository_index_of(spec, state.status, state.reason, ready)


@router.get("/models/stats")
async def all_statistics(state: State, _: Authorized) -> dict:
    """Triton's statistics for every model (here the one)."""
    return model_statistics_of(state.require_ready().model.spec, metrics.STATISTICS)


@router.get("/models/{name}", response_model=ModelMetadata)
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, dependencies=VERSIONED)
async def model_metadata(serving: Served) -> ModelMetadata:
    """Model metadata: platform, version, and the input and output tensors (-1: the batch axis)."""
    return model_metadata_of(serving.model.spec)


@router.get("/models/{name}/ready", response_model=ModelReady)
@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady, dependencies=VERSIONED)
async def model_ready(serving: Served) -> ModelReady:
    """Model readiness: 200 when this model is served and warmed up, 503 before, 404 for another model."""
    return ModelReady(name=serving.model.spec.name, ready=True)


@router.get("/models/{name}/config")
@router.get("/models/{name}/versions/{version}/config", dependencies=VERSIONED)
async def model_config(state: State, serving: Served) -> dict:
    """Triton's model configuration: max_batch_size, the tensors (without the batch axis), dynamic batching."""
    return model_config_of(serving.model.spec, state.settings)


@router.get("/models/{name}/stats")
@router.get("/models/{name}/versions/{version}/stats", dependencies=VERSIONED)
async def model_statistics(serving: Served) -> dict:
    """Triton's statistics since start: inference and execution counts, success/fail, queue and compute time,
    per batch size."""
    return model_statistics_of(serving.model.spec, metrics.STATISTICS)


def refusable(path: str, state: ServiceState) -> tuple[str, str] | None:
    """For ``service.http.early_refusal``: (error key, route template) when a POST to ``path`` is inference on
    the served model (any other name or version is left to the routes, which answer 404)."""
    parts = path.split("/")  # "", "v2", "models", name, ["versions", version,] "infer"
    if len(parts) not in (5, 7) or parts[:3] != ["", "v2", "models"] or parts[-1] != "infer" or state.serving is None:
        return None
    spec = state.serving.model.spec
    if parts[3] != spec.name:
        return None
    if len(parts) == 5:
        return "error", "/v2/models/{name}/infer"
    if parts[4] == "versions" and parts[5] == spec.version:
        return "error", "/v2/models/{name}/versions/{version}/infer"
    return None


@router.post("/models/{name}/infer", response_model=InferenceResponse, openapi_extra=INFER_BODY)
@router.post("/models/{name}/versions/{version}/infer", response_model=InferenceResponse, openapi_extra=INFER_BODY,
             dependencies=VERSIONED)
async def infer(
    request: Request,
    state: State,
    serving: Served,
    inference_header_content_length: Annotated[int | None, Header(ge=0)] = None,
) -> Response:
    """Classify tensors (FP32 preprocessed, or UINT8 pixels for a model that takes them) or BYTES (encoded images)."""
    started = time.perf_counter()
    body = await read_body(request.receive, request.headers, state.settings)
    header, binary = split_body(body, inference_header_content_length)
    req = parse_header(header)
    batch = read_input(req, binary, serving.model.spec)
    wanted = requested_outputs(req)  # before inference: a bad output name costs the model nothing
    classify = classify_tensors if isinstance(batch, np.ndarray) else classify_images
    classification = await classify(state, batch, disconnected(request.receive))
    head, blobs = encode_response(req, classification.model.spec, classification.logits, wanted)
    headers = {"Server-Timing": classification.server_timing(started)}
    if not blobs:
        return Response(head, media_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(len(head))
    return Response(head + b"".join(blobs), media_type="application/octet-stream", headers=headers)


@router.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                  include_in_schema=False)
async def not_found(request: Request) -> Response:
    """Any other path under /v2: 404 (or 405 for a known path and the wrong method) in the protocol's shape."""
    scope = {**request.scope, "path": request.url.path}
    for route in router.routes:
        if isinstance(route, APIRoute) and route.endpoint is not not_found and route.matches(scope)[0] == Match.PARTIAL:
            return JSONResponse({"error": "Method Not Allowed"}, status_code=405, headers={"Allow": ", ".join(
                sorted(route.methods))})
    return JSONResponse({"error": "Not Found"}, status_code=404)
