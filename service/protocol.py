"""The Open Inference Protocol (KServe V2) codec, free of any transport: its request and response schemas,
tensors (FP32, or UINT8 for a model that takes pixels, and BYTES, JSON or Triton's binary tensor data
extension) and model metadata. The REST door
(``service.v2``) uses it, and any other door of the protocol can.

Specs: kserve/open-inference-protocol ``specification/protocol/inference_rest.md``;
triton-inference-server/server ``docs/protocol/extension_binary_data.md``, ``extension_classification.md``,
``extension_model_repository.md``, ``extension_model_configuration.md``, ``extension_statistics.md``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contract import LOGITS, OUTPUT_NAMES, PROBABILITIES, ModelSpec
from service.errors import InvalidInferenceRequest
from service.metrics import InferenceStatistics
from service.runtime import softmax
from service.settings import Settings

SERVER_NAME = "resnet-serve"
PLATFORM = "onnxruntime_onnx"  # the platform string Triton gives an ONNX model run by onnxruntime
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "model_configuration", "statistics"]
OUTPUTS = OUTPUT_NAMES  # probabilities: runtime.softmax of the logits, as /predict computes them
HEADER_LENGTH = "Inference-Header-Content-Length"
# The model's input dtype (``ModelSpec.input_dtype``) -> the protocol's datatype and what a client sends in it.
TENSOR_DATATYPES = {"float32": "FP32", "uint8": "UINT8"}
TENSOR_MEANING = {"FP32": "preprocessed", "UINT8": "pixels 0..255, normalised by the model"}
# Parameters that ask for a feature this server lacks. Ignoring them would answer a different question
# (data in the body where shared memory was named).
UNSUPPORTED = {"shared_memory_region": "shared memory"}


# --- request and response bodies ------------------------------------------------------------------------------------


class Parameters(BaseModel):
    """Parameters this server does not know are accepted and ignored, as the protocol allows."""

    model_config = ConfigDict(extra="allow")


class InputParameters(Parameters):
    binary_data_size: int | None = Field(None, ge=0, description="bytes of this tensor after the JSON header")


class OutputParameters(Parameters):
    binary_data: bool | None = Field(None, description="return this output as binary data")
    classification: int | None = Field(None, ge=0, description="the top k classes as BYTES '<value>:<index>:<label>'"
                                                               " instead of the tensor (0: the tensor)")


class RequestParameters(Parameters):
    binary_data_output: bool = Field(False, description="return every output as binary data unless it says otherwise")


class RequestInput(BaseModel):
    name: str = Field(examples=["input"])
    shape: list[Annotated[int, Field(ge=0)]] = Field(examples=[[1, 1, 32, 32]])
    datatype: str = Field(examples=["FP32"])
    parameters: InputParameters = Field(default_factory=InputParameters)
    data: list[Any] | None = Field(None, description="row-major, flat or nested; BYTES elements as base64 strings")


class RequestOutput(BaseModel):
    name: str = Field(examples=["probabilities"])
    parameters: OutputParameters = Field(default_factory=OutputParameters)


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: RequestParameters = Field(default_factory=RequestParameters)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(None, description="the outputs to return; default: all")


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


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, int] | None = Field(None, description="binary_data_size when sent as binary data")
    data: list[float] | list[str] | None = Field(None, description="row-major, flat; BYTES (classification) as "
                                                                   "'<value>:<index>:<label>' strings")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it had one")
    outputs: list[ResponseOutput]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class V2Error(BaseModel):
    error: str = Field(examples=["unknown model 'resnet'"])


# --- reading a request ----------------------------------------------------------------------------------------------


def split_body(body: bytes, header_length: int | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tensor data that follows it."""
    if header_length is None:
        return body, memoryview(b"")
    if header_length == 0:
        raise InvalidInferenceRequest(f"{HEADER_LENGTH}: 0 (a raw binary request) is not supported: send a JSON header")
    if header_length > len(body):
        raise InvalidInferenceRequest(f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes")
    return body[:header_length], memoryview(body)[header_length:]


def parse_header(header: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as e:
        raise invalid_request(e) from e


def validate_request(fields: dict[str, Any]) -> InferenceRequest:
    """A request another transport has already decoded (e.g. gRPC's protobuf), checked as a JSON one is."""
    try:
        return InferenceRequest.model_validate(fields)
    except ValidationError as e:
        raise invalid_request(e) from e


def invalid_request(e: ValidationError) -> InvalidInferenceRequest:
    first = e.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "request"
    return InvalidInferenceRequest(f"invalid {where}: {first['msg']}")


def refuse_unsupported(parameters: Parameters, where: str) -> None:
    for key in parameters.model_extra or {}:
        if key in UNSUPPORTED:
            raise InvalidInferenceRequest(f"{where}: {UNSUPPORTED[key]} ({key!r}) is not supported")


def read_input(req: InferenceRequest, binary: memoryview, spec: ModelSpec) -> np.ndarray | list[bytes]:
    """The request's one input: an (N, C, H, W) batch in the model's input datatype (FP32, or UINT8 for a model that
    normalises pixels itself) or N encoded images (BYTES).

    FP32 sent to a UINT8 model is refused, not converted: an FP32 tensor here means normalised input, and guessing
    the scale a client meant would answer confidently wrong; the model metadata says which datatype to send."""
    if len(req.inputs) != 1:
        raise InvalidInferenceRequest(f"model {spec.name!r} takes one input, got {len(req.inputs)}")
    inp = req.inputs[0]
    where = f"input {inp.name!r}"
    if inp.name != spec.input_name:
        raise InvalidInferenceRequest(f"unknown input {inp.name!r}: model {spec.name!r} takes {spec.input_name!r}")
    refuse_unsupported(inp.parameters, where)
    datatype = TENSOR_DATATYPES[spec.input_dtype]
    if inp.datatype == datatype:
        if len(inp.shape) != 4 or inp.shape[1:] != [spec.channels, *spec.input_size]:
            c, (h, w) = spec.channels, spec.input_size
            raise InvalidInferenceRequest(f"{where}: {datatype} shape must be [N, {c}, {h}, {w}], got {inp.shape}")
    elif inp.datatype == "BYTES":
        if len(inp.shape) != 1:
            raise InvalidInferenceRequest(f"{where}: BYTES holds one encoded image per element, shape [N]; "
                                          f"got {inp.shape}")
    else:
        raise InvalidInferenceRequest(f"{where}: datatype {inp.datatype!r} is not accepted: send {datatype} "
                                      f"({TENSOR_MEANING[datatype]}, [N, C, H, W]) or BYTES (encoded images, [N])")
    n = inp.shape[0]
    if n < 1:
        raise InvalidInferenceRequest(f"{where}: the batch is empty")
    raw = tensor_bytes(inp, binary, where)
    if inp.datatype == "BYTES":
        return encoded_images(inp, raw, where)
    return fp32_tensor(inp, raw, where) if datatype == "FP32" else uint8_tensor(inp, raw, where)


def tensor_bytes(inp: RequestInput, binary: memoryview, where: str) -> memoryview | None:
    """The input's binary data, or None when its data is in the JSON."""
    size = inp.parameters.binary_data_size
    if size is None:
        if len(binary):
            raise InvalidInferenceRequest(f"{len(binary)} bytes follow the JSON header, but no input has "
                                          "binary_data_size")
        if inp.data is None:
            raise InvalidInferenceRequest(f"{where} has neither data nor binary_data_size")
        return None
    if inp.data is not None:
        raise InvalidInferenceRequest(f"{where} has both data and binary_data_size")
    if size != len(binary):
        raise InvalidInferenceRequest(f"{where} has binary_data_size {size}, but {len(binary)} bytes follow the "
                                      "JSON header")
    return binary


def fp32_tensor(inp: RequestInput, raw: memoryview | None, where: str) -> np.ndarray:
    count = math.prod(inp.shape)
    if raw is not None:
        if len(raw) != count * 4:
            raise InvalidInferenceRequest(f"{where}: FP32 {inp.shape} is {count * 4} bytes, got {len(raw)}")
        x = np.frombuffer(raw, "<f4").reshape(inp.shape)
    else:
        try:
            values = np.asarray(inp.data)
        except ValueError as e:  # ragged nesting
            raise InvalidInferenceRequest(f"{where}: data is not a regular array") from e
        if values.dtype.kind not in "iuf":
            raise InvalidInferenceRequest(f"{where}: FP32 data must be numbers")
        if values.size != count:
            raise InvalidInferenceRequest(f"{where}: shape {inp.shape} holds {count} values, data has {values.size}")
        x = values.reshape(inp.shape).astype(np.float32)
    if not np.isfinite(x).all():
        raise InvalidInferenceRequest(f"{where}: data holds NaN or infinity")
    return x


def uint8_tensor(inp: RequestInput, raw: memoryview | None, where: str) -> np.ndarray:
    count = math.prod(inp.shape)
    if raw is not None:
        if len(raw) != count:
            raise InvalidInferenceRequest(f"{where}: UINT8 {inp.shape} is {count} bytes, got {len(raw)}")
        return np.frombuffer(raw, np.uint8).reshape(inp.shape)
    try:
        values = np.asarray(inp.data)
    except ValueError as e:  # ragged nesting
        raise InvalidInferenceRequest(f"{where}: data is not a regular array") from e
    if values.dtype.kind not in "iu" or (values.size and (values.min() < 0 or values.max() > 255)):
        raise InvalidInferenceRequest(f"{where}: UINT8 data must be integers 0..255")
    if values.size != count:
        raise InvalidInferenceRequest(f"{where}: shape {inp.shape} holds {count} values, data has {values.size}")
    return values.reshape(inp.shape).astype(np.uint8)


def encoded_images(inp: RequestInput, raw: memoryview | None, where: str) -> list[bytes]:
    """BYTES elements. In binary data each is a 4-byte little-endian length and that many bytes; in JSON,
    where the protocol wants UTF-8 strings and an image is not one, each is a base64 string."""
    if raw is not None:
        images, at = [], 0
        while at < len(raw):
            size = struct.unpack_from("<I", raw, at)[0] if len(raw) - at >= 4 else None
            if size is None or at + 4 + size > len(raw):
                raise InvalidInferenceRequest(f"{where}: malformed BYTES data: element {len(images)} runs past "
                                              "the end of the tensor")
            images.append(bytes(raw[at + 4:at + 4 + size]))
            at += 4 + size
    else:
        images = [base64_element(v, where) for v in inp.data or []]
    if len(images) != inp.shape[0]:
        raise InvalidInferenceRequest(f"{where}: shape {inp.shape} but {len(images)} BYTES elements")
    return images


def base64_element(value: object, where: str) -> bytes:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):  # ValueError: a non-ASCII string
            pass
    raise InvalidInferenceRequest(f"{where}: BYTES data in JSON must be base64 strings of encoded images")


@dataclass(frozen=True)
class Wanted:
    """An output to return: as binary data or not, and as its top ``class_count`` classes or the tensor."""

    name: str
    binary: bool
    class_count: int = 0


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str  # FP32, or BYTES for classification
    shape: list[int]
    values: np.ndarray | list[bytes]  # float32 (N, classes), or the BYTES elements row-major


def requested_outputs(req: InferenceRequest) -> list[Wanted]:
    """The outputs to return, in the order asked."""
    default = req.parameters.binary_data_output
    if not req.outputs:
        return [Wanted(name, default) for name in OUTPUTS]
    wanted = []
    for out in req.outputs:
        if out.name not in OUTPUTS:
            raise InvalidInferenceRequest(f"unknown output {out.name!r}: the model gives {', '.join(OUTPUTS)}")
        refuse_unsupported(out.parameters, f"output {out.name!r}")
        binary = default if out.parameters.binary_data is None else out.parameters.binary_data
        wanted.append(Wanted(out.name, binary, out.parameters.classification or 0))
    return wanted


def output_tensors(spec: ModelSpec, logits: np.ndarray, wanted: list[Wanted]) -> list[OutputTensor]:
    """The answer's tensors, whatever the transport: logits, probabilities, or their top classes."""
    if not np.isfinite(logits).all():  # e.g. finite inputs near float32's limit; JSON could not carry the answer
        raise InvalidInferenceRequest("the model's output for this input is not finite")
    tensors = {LOGITS: logits, PROBABILITIES: softmax(logits).astype(np.float32)}
    out = []
    for w in wanted:
        tensor = tensors[w.name]
        if w.class_count:
            k = min(w.class_count, tensor.shape[1])
            out.append(OutputTensor(w.name, "BYTES", [len(tensor), k], classes(tensor, k, spec.labels)))
        else:
            out.append(OutputTensor(w.name, "FP32", list(tensor.shape), tensor))
    return out


def classes(tensor: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """Triton's classification extension: per row, the k largest values as ``<value>:<index>:<label>``,
    largest first (``%f``, as Triton prints the value)."""
    top = np.argsort(-tensor, axis=1, kind="stable")[:, :k]  # (N, k)
    return [f"{row[i]:f}:{i}:{labels[i]}".encode() for row, idx in zip(tensor, top, strict=True) for i in idx]


def bytes_elements(elements: list[bytes]) -> bytes:
    """BYTES elements as binary data: each a 4-byte little-endian length and that many bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def raw_contents(tensor: OutputTensor) -> bytes:
    """A tensor's binary data (the binary extension's blob, gRPC's raw_output_contents)."""
    if tensor.datatype == "BYTES":
        return bytes_elements(tensor.values)
    return tensor.values.astype("<f4").tobytes()


def encode_response(req: InferenceRequest, spec: ModelSpec, logits: np.ndarray, wanted: list[Wanted]
                    ) -> tuple[bytes, list[bytes]]:
    """The response's JSON header and the binary tensors that follow it (empty when every output is JSON)."""
    outputs, blobs = [], []
    for w, tensor in zip(wanted, output_tensors(spec, logits, wanted), strict=True):
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if w.binary:
            blob = raw_contents(tensor)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.datatype == "BYTES":
            out["data"] = [e.decode() for e in tensor.values]
        else:
            out["data"] = tensor.values.ravel().tolist()
        outputs.append(out)
    body = {"model_name": spec.name, "model_version": spec.version, **({} if req.id is None else {"id": req.id}),
            "outputs": outputs}
    return json.dumps(body, separators=(",", ":")).encode(), blobs


def model_metadata_of(spec: ModelSpec) -> ModelMetadata:
    classes = [-1, len(spec.labels)]
    datatype = TENSOR_DATATYPES[spec.input_dtype]
    return ModelMetadata(
        name=spec.name, versions=[spec.version], platform=PLATFORM,
        inputs=[TensorMetadata(name=spec.input_name, datatype=datatype, shape=spec.input_shape)],
        outputs=[TensorMetadata(name=name, datatype="FP32", shape=classes) for name in OUTPUTS],
    )


# --- Triton's extensions: repository index, model configuration, statistics ---------------------------------------
# Plain dicts in the JSON shape Triton gives (proto field names): the REST door returns them as they are, the
# gRPC door parses them into its messages (google.protobuf.json_format), so both doors say the same.

REPOSITORY_STATE = {"ready": "READY", "loading": "LOADING", "failed": "UNAVAILABLE", "draining": "UNAVAILABLE"}


def repository_index_of(spec: ModelSpec | None, status: str, reason: str | None, ready_only: bool
                        ) -> list[dict[str, str]]:
    """The one model of this server's repository, with its state (nothing while it has never loaded)."""
    if spec is None or (ready_only and status != "ready"):
        return []
    entry = {"name": spec.name, "version": spec.version, "state": REPOSITORY_STATE.get(status, "UNAVAILABLE")}
    return [entry | ({"reason": reason} if reason and status != "ready" else {})]


def model_config_of(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """What Triton's tools read from a model configuration: the batch limit, the tensors without the batch axis,
    and the dynamic batcher's settings."""
    classes = [len(spec.labels)]
    return {
        "name": spec.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": settings.max_batch_size,
        "input": [{"name": spec.input_name, "data_type": f"TYPE_{TENSOR_DATATYPES[spec.input_dtype]}",
                   "format": "FORMAT_NCHW", "dims": [spec.channels, *spec.input_size]}],
        "output": [{"name": name, "data_type": "TYPE_FP32", "dims": classes} for name in OUTPUTS],
        "dynamic_batching": {"preferred_batch_size": [settings.max_batch_size],
                             "max_queue_delay_microseconds": round(settings.max_batch_delay_ms * 1000)},
    }


def model_statistics_of(spec: ModelSpec, stats: InferenceStatistics) -> dict[str, Any]:
    """Triton's statistics for the served model since the service started, over all its workers (durations in ns)."""
    figures = stats.figures()
    return {"model_stats": [{
        "name": spec.name,
        "version": spec.version,
        "last_inference": figures.last_inference_ms,
        "inference_count": figures.inference_count,
        "execution_count": figures.execution_count,
        "inference_stats": figures.durations,
        "batch_stats": [{"batch_size": size, "compute_infer": d} for size, d in sorted(figures.batches.items())],
    }]}
