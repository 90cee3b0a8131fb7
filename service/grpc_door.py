"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``, port 8001 as Triton's), with the
standard ``grpc.health.v1`` health service (Kubernetes' ``grpc:`` probes) and server reflection (``grpcurl``).

Another door into ``service.core``, beside the REST one and in the same event loop: the same micro-batcher,
limits, deadline and API keys (``authorization: Bearer <key>`` metadata). A request becomes the codec's
``InferenceRequest`` (``service.protocol``), so both doors check and answer alike; domain errors become gRPC status
codes in one table here. Messages: ``service/proto/inference.proto`` (``make proto`` regenerates the modules).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import errors, metrics
from service.auth import check_key
from service.core import Pipeline, ServiceState, classify_images, classify_tensors
from service.proto import inference_pb2 as pb
from service.proto import inference_pb2_grpc as pb_grpc
from service.protocol import (
    EXTENSIONS,
    SERVER_NAME,
    model_config_of,
    model_metadata_of,
    model_statistics_of,
    output_tensors,
    raw_contents,
    read_input,
    repository_index_of,
    requested_outputs,
    validate_request,
)

log = logging.getLogger("service")

Code = grpc.StatusCode
GRPC_STATUS: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.EmptyBody: Code.INVALID_ARGUMENT,
    errors.InvalidImage: Code.INVALID_ARGUMENT,
    errors.InvalidInferenceRequest: Code.INVALID_ARGUMENT,
    errors.ImageTooLarge: Code.INVALID_ARGUMENT,
    errors.TooManyImages: Code.INVALID_ARGUMENT,
    errors.Unauthorized: Code.UNAUTHENTICATED,
    errors.UnknownModel: Code.NOT_FOUND,
    errors.PayloadTooLarge: Code.RESOURCE_EXHAUSTED,
    errors.QueueFull: Code.RESOURCE_EXHAUSTED,
    errors.ClientGone: Code.CANCELLED,
    errors.InferenceFailed: Code.INTERNAL,
    errors.ModelNotReady: Code.UNAVAILABLE,
    errors.DeadlineExceeded: Code.DEADLINE_EXCEEDED,
}
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def code_of(exc: errors.ServiceError) -> grpc.StatusCode:
    return next((GRPC_STATUS[c] for c in type(exc).__mro__ if c in GRPC_STATUS), Code.INTERNAL)


def answered(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Every failure of a call as a status and a short message (the one place this door maps errors), and the
    call counted by method and code."""
    name = method.__name__

    @functools.wraps(method)
    async def handle(self: InferenceServicer, request: Any, context: aio.ServicerContext) -> Any:
        started, code = time.perf_counter(), Code.OK
        try:
            if isinstance(request, Malformed):
                raise errors.InvalidInferenceRequest(f"malformed {request.message} message: {request.error}")
            return await method(self, request, context)
        except errors.ServiceError as e:
            code = code_of(e)
            if isinstance(e, errors.QueueFull):
                context.set_trailing_metadata((("retry-after", str(max(1, round(e.retry_after_s)))),))
            await context.abort(code, e.detail)
        except asyncio.CancelledError:  # the client left or its deadline passed: grpc has answered it already
            remaining = context.time_remaining()
            code = Code.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else Code.CANCELLED
            raise
        except aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - any other failure is an INTERNAL with an id in the log
            code, error_id = Code.INTERNAL, uuid.uuid4().hex[:12]
            log.error("error_id=%s unexpected failure on gRPC %s", error_id, name, exc_info=e)
            await context.abort(code, f"internal error (error_id={error_id})")
        finally:
            metrics.GRPC_REQUESTS.labels(name, code.name).inc()
            metrics.GRPC_LATENCY.labels(name).observe(time.perf_counter() - started)

    return handle


@dataclass(frozen=True)
class Malformed:
    """A request that did not parse: answered INVALID_ARGUMENT by the method (grpc itself would say INTERNAL)."""

    message: str
    error: str


def tolerant(message: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return message.FromString(data)
        except DecodeError as e:
            return Malformed(message.DESCRIPTOR.name, str(e) or "not a protobuf message")

    return parse


def inference_handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The generated registration, with requests parsed by ``tolerant``."""
    methods = {}
    for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        methods[m.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name), request_deserializer=tolerant(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def authorization(context: aio.ServicerContext) -> str | None:
    return next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)


def parameter(p: pb.InferParameter) -> bool | int | float | str | None:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def parameters(params: Any) -> dict[str, Any]:
    return {k: parameter(v) for k, v in params.items()}


# Which typed-contents field carries each datatype this server accepts; anything else in contents is a lie.
CONTENTS_FIELD = {"FP32": "fp32_contents", "UINT8": "uint_contents", "BYTES": "bytes_contents"}


def input_bytes(request: pb.ModelInferRequest, i: int, datatype: str) -> bytes:
    """Input ``i``'s data as binary data (the framing of Triton's binary extension, which gRPC's raw contents
    share): from ``raw_input_contents`` or from the typed ``contents``, never both."""
    inp = request.inputs[i]
    filled = [f.name for f, _ in inp.contents.ListFields()]
    if request.raw_input_contents:
        if filled:
            raise errors.InvalidInferenceRequest(f"input {inp.name!r} has contents, but the request has "
                                                 "raw_input_contents: send one or the other")
        if len(request.raw_input_contents) != len(request.inputs):
            raise errors.InvalidInferenceRequest(f"{len(request.raw_input_contents)} raw_input_contents for "
                                                 f"{len(request.inputs)} inputs")
        return request.raw_input_contents[i]
    wanted = CONTENTS_FIELD.get(datatype)
    if wanted is None:
        return b""  # read_input names the datatype it refuses
    others = [f for f in filled if f != wanted]
    if others:
        raise errors.InvalidInferenceRequest(f"input {inp.name!r}: {datatype} data goes in contents.{wanted}, "
                                             f"got {', '.join(others)}")
    if datatype == "FP32":
        return np.asarray(inp.contents.fp32_contents, "<f4").tobytes()
    if datatype == "UINT8":  # the protocol carries UINT8 in uint32 fields
        values = np.asarray(inp.contents.uint_contents, np.uint32)
        if values.size and values.max() > 255:
            raise errors.InvalidInferenceRequest(f"input {inp.name!r}: UINT8 data must be integers 0..255")
        return values.astype(np.uint8).tobytes()
    return b"".join(struct.pack("<I", len(e)) + e for e in inp.contents.bytes_contents)


def read_request(request: pb.ModelInferRequest, pipeline: Pipeline) -> tuple[Any, Any, np.ndarray | list[bytes]]:
    """The protobuf request as the codec's ``InferenceRequest``, the outputs wanted and the input batch."""
    blobs = [input_bytes(request, i, inp.datatype) for i, inp in enumerate(request.inputs)]
    req = validate_request({
        "id": request.id or None,
        "inputs": [{
            "name": inp.name, "datatype": inp.datatype, "shape": list(inp.shape),
            "parameters": parameters(inp.parameters) | {"binary_data_size": len(blob)},
        } for inp, blob in zip(request.inputs, blobs, strict=True)],
        "outputs": [{"name": out.name, "parameters": parameters(out.parameters)} for out in request.outputs] or None,
    })
    wanted = requested_outputs(req)  # before inference: a bad output name costs the model nothing
    batch = read_input(req, memoryview(blobs[0]) if blobs else memoryview(b""), pipeline.model.spec)
    return req, wanted, batch


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServiceState, version: str) -> None:
        self.state, self.version = state, version

    def served(self, context: aio.ServicerContext, name: str, version: str = "") -> Pipeline:
        """The served model if it is the one named (an empty version: the one served); the key first, so that
        without one a client cannot tell which model names exist."""
        check_key(self.state.settings.api_keys, authorization(context))
        serving = self.state.require_ready()
        spec = serving.model.spec
        if name != spec.name:
            raise errors.UnknownModel(f"unknown model {name!r}")
        if version and version != spec.version:
            raise errors.UnknownModel(f"unknown version {version!r} of model {name!r}")
        return serving

    @answered
    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @answered
    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.ready)

    @answered
    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            self.served(context, request.name, request.version)
        except (errors.ModelNotReady, errors.UnknownModel):  # not an error here: the answer is "not ready"
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @answered
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        check_key(self.state.settings.api_keys, authorization(context))
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    @answered
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        spec = self.served(context, request.name, request.version).model.spec
        return json_format.ParseDict(model_metadata_of(spec).model_dump(), pb.ModelMetadataResponse())

    @answered
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: aio.ServicerContext
                          ) -> pb.ModelConfigResponse:
        spec = self.served(context, request.name, request.version).model.spec
        return pb.ModelConfigResponse(config=json_format.ParseDict(model_config_of(spec, self.state.settings),
                                                                   pb.ModelConfig()))

    @answered
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: aio.ServicerContext
                              ) -> pb.ModelStatisticsResponse:
        if request.name:
            spec = self.served(context, request.name, request.version).model.spec
        else:  # every model: here the one
            check_key(self.state.settings.api_keys, authorization(context))
            spec = self.state.require_ready().model.spec
        return json_format.ParseDict(model_statistics_of(spec, metrics.STATISTICS), pb.ModelStatisticsResponse())

    @answered
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: aio.ServicerContext
                              ) -> pb.RepositoryIndexResponse:
        check_key(self.state.settings.api_keys, authorization(context))
        state = self.state
        spec = state.serving.model.spec if state.serving else None
        models = repository_index_of(spec, state.status, state.reason, request.ready)
        return json_format.ParseDict({"models": models}, pb.RepositoryIndexResponse())

    @answered
    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        serving = self.served(context, request.model_name, request.model_version)
        req, wanted, batch = read_request(request, serving)
        classify = classify_tensors if isinstance(batch, np.ndarray) else classify_images
        # The client's own deadline, if sooner than ours, or a cancelled call: grpc cancels this coroutine,
        # and the core then drops the request's queued images (core.guarded).
        classification = await classify(self.state, batch)
        spec = classification.model.spec
        tensors = output_tensors(spec, classification.logits, wanted)
        return pb.ModelInferResponse(
            model_name=spec.name, model_version=spec.version, id=req.id or "",
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                     for t in tensors],
            raw_output_contents=[raw_contents(t) for t in tensors],
        )


class HealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1``: SERVING exactly when the service is ready (read from the state at each call, so it
    cannot lag behind readiness), for the server ("") and for the inference service."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def status(self, service: str) -> int:
        status = health_pb2.HealthCheckResponse
        if service not in ("", SERVICE):
            return status.SERVICE_UNKNOWN
        return status.SERVING if self.state.ready else status.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext
                    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(Code.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext):
        last = None
        while True:  # the protocol's stream: the status now, then each change (polled: readiness has no events)
            status = self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(0.5)


def build_server(state: ServiceState, version: str) -> aio.Server:
    """The gRPC server for ``state``, bound on ``host:grpc_port`` (not started). Messages are limited to
    ``max_upload_bytes`` as the HTTP bodies are (after inflation, when compressed)."""
    settings = state.settings
    server = aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_upload_bytes),
        # Workers share the port as they share the HTTP one; a lone server on a taken port is an error instead.
        ("grpc.so_reuseport", int(state.supervised)),
    ])
    server.add_generic_rpc_handlers((inference_handlers(InferenceServicer(state, version)),))
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(state), server)
    reflection.enable_server_reflection([SERVICE, HEALTH, reflection.SERVICE_NAME], server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    server.add_insecure_port(f"{host}:{settings.grpc_port}")
    return server
