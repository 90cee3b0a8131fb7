"""The Open Inference Protocol (KServe V2) over HTTP/REST, so Triton's and KServe's clients and tools work
against this service: health, server and model metadata. With API keys set, everything but health needs one.

Spec: kserve/open-inference-protocol ``specification/protocol/inference_rest.md``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from service.app import State
from service.auth import Authorized
from service.core import Serving
from service.errors import UnknownModel
from service.runtime import ModelSpec

SERVER_NAME = "resnet-serve"
PLATFORM = "onnxruntime_onnx"  # the platform string Triton gives an ONNX model run by onnxruntime
EXTENSIONS: list[str] = []
OUTPUTS = ("logits", "probabilities")  # probabilities: runtime.softmax of the logits, as /predict computes them


# --- request and response bodies ------------------------------------------------------------------------------------


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 is the dynamic batch axis")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="first 12 hex digits of the ONNX file's sha256")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class V2Error(BaseModel):
    error: str = Field(examples=["unknown model 'resnet'"])


# --- shaping the answer ---------------------------------------------------------------------------------------------


def model_metadata_of(spec: ModelSpec) -> ModelMetadata:
    classes = [-1, len(spec.labels)]
    return ModelMetadata(
        name=spec.name, versions=[spec.version], platform=PLATFORM,
        inputs=[TensorMetadata(name=spec.input_name, datatype="FP32", shape=spec.input_shape)],
        outputs=[TensorMetadata(name=name, datatype="FP32", shape=classes) for name in OUTPUTS],
    )


# --- routes ---------------------------------------------------------------------------------------------------------


def served_model(state: State, _: Authorized, name: str) -> Serving:
    """The served model, if it is the one the path names. The key is checked first, so that without one
    a client cannot tell which model names exist."""
    serving = state.require_ready()
    if name != serving.model.spec.name:
        raise UnknownModel(f"unknown model {name!r}")
    return serving


Served = Annotated[Serving, Depends(served_model)]


def served_version(serving: Served, name: str, version: str) -> None:
    """The /versions/{version} forms: the version must be the one served (FastAPI runs served_model once)."""
    if version != serving.model.spec.version:
        raise UnknownModel(f"unknown version {version!r} of model {name!r}")


VERSIONED = [Depends(served_version)]

ERRORS = {code: {"model": V2Error} for code in (400, 401, 404, 413, 415, 429, 503, 504)}

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe V2)"], responses=ERRORS)


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
