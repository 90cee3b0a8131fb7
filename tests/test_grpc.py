"""The Open Inference Protocol over gRPC: tritonclient.grpc (sync and aio), KServe's own clients, grpc health and
reflection against ``python -m service`` as a real process; answers held to the REST door's within 1e-6, every
error a clear status (never INTERNAL), cancelled calls leaving nothing queued, and the drain on SIGTERM.

This process loads tritonclient's generated ``inference`` messages; ours (``service.proto``) define the same names,
and one protobuf pool cannot hold both, so nothing here imports ``service.grpc_door``: the server process does."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench.harness import Server as LiveServer
from bench.harness import free_port, serve_service, start_service
from service.preprocessing import Preprocessor
from service.protocol import EXTENSIONS
from tests.conftest import ROOT
from tests.images import FORMATS, bomb_png, encode, one_per_class
from tests.procfs import socket_inodes

KEY = "grpc-test-key-0123456789"
LIMITS = {"RESNET_MAX_UPLOAD_BYTES": "200000", "RESNET_MAX_BATCH_IMAGES": "16", "RESNET_MAX_BATCH_SIZE": "8"}
PNGS = [encode(img, "PNG") for img, _ in one_per_class()]
SERVICE = "inference.GRPCInferenceService"


def grpc_server(tmp_path_factory, name: str, **env: str) -> Iterator[LiveServer]:
    """A ready ``python -m service`` with the gRPC door on a free port (``server.grpc``)."""
    port = free_port()
    with serve_service({"RESNET_GRPC_PORT": str(port), **env}, tmp_path_factory.mktemp(name) / "server.log") as s:
        s.grpc = f"127.0.0.1:{port}"
        yield s


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    yield from grpc_server(tmp_path_factory, "grpc", **LIMITS)


@pytest.fixture(scope="module")
def client(server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.grpc)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """The raw service, for what tritonclient never sends (typed contents, malformed messages)."""
    with grpc.insecure_channel(server.grpc) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def rest_infer(http: httpx.Client, images: list[bytes]) -> dict[str, np.ndarray]:
    """The REST door's answer for the same images (JSON tensors; BYTES as base64)."""
    import base64

    body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [len(images)],
                        "data": [base64.b64encode(i).decode() for i in images]}]}
    r = http.post("/v2/models/default/infer", json=body)
    assert r.status_code == 200, r.text
    return {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in r.json()["outputs"]}


def image_input(images: list[bytes]) -> triton.InferInput:
    inp = triton.InferInput("input", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_))
    return inp


def fp32_input(x: np.ndarray) -> triton.InferInput:
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def code_of(call) -> tuple[str, str]:
    """The status and message a tritonclient call failed with."""
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value.status(), e.value.message()


# --- health and metadata ---------------------------------------------------------------------------------------------


def test_server_health_and_metadata_via_tritonclient_grpc(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta == {"name": "resnet-serve", "version": "0.1.0", "extensions": EXTENSIONS}, meta


@pytest.mark.parametrize(
    ("name", "version", "ready"),
    [
        pytest.param("default", "", True, id="served"),
        pytest.param("default", "served-version", True, id="served-version"),
        pytest.param("resnet", "", False, id="unknown-model"),
        pytest.param("default", "1", False, id="unknown-version"),
    ],
)
def test_model_ready_via_tritonclient_grpc(client, spec, name, version, ready):
    version = spec.version if version == "served-version" else version
    assert client.is_model_ready(name, version) is ready


def test_model_metadata_equals_rest(client, http, spec):
    r = http.get("/v2/models/default")
    assert r.status_code == 200, r.text
    meta = client.get_model_metadata("default", spec.version, as_json=True)
    for t in meta["inputs"] + meta["outputs"]:
        t["shape"] = [int(d) for d in t["shape"]]  # protobuf's JSON gives int64 as strings
    assert meta == r.json()


# --- inference ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_infer_images_of_every_format_equals_rest(client, http, fmt):
    images = [FORMATS[fmt](img) for img, _ in one_per_class()]
    result = client.infer("default", [image_input(images)])
    rest = rest_infer(http, images)
    for name in ("logits", "probabilities"):
        np.testing.assert_allclose(result.as_numpy(name), rest[name], rtol=0, atol=1e-6)
    assert list(result.as_numpy("probabilities").argmax(axis=1)) == list(range(10)), fmt


def test_infer_fp32_equals_rest(client, http, spec):
    x = np.stack([Preprocessor(spec, 10**7)(data).x for data in PNGS])  # (10, 1, 32, 32)
    result = client.infer("default", [fp32_input(x)])
    rest = rest_infer(http, PNGS)
    np.testing.assert_allclose(result.as_numpy("probabilities"), rest["probabilities"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("logits"), rest["logits"], rtol=0, atol=1e-6)


def test_infer_with_aio_client_equals_sync(server, client):
    async def infer() -> np.ndarray:
        async with triton_aio.InferenceServerClient(server.grpc) as c:
            assert await c.is_server_ready()
            return (await c.infer("default", [image_input(PNGS)])).as_numpy("probabilities")

    sync = client.infer("default", [image_input(PNGS)]).as_numpy("probabilities")
    np.testing.assert_allclose(asyncio.run(infer()), sync, rtol=0, atol=1e-6)


def test_infer_echoes_id_and_returns_only_requested_outputs(client, spec):
    result = client.infer("default", [image_input(PNGS[4:5])], request_id="req-42",
                          outputs=[triton.InferRequestedOutput("probabilities")])
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-42", "default", spec.version)
    assert [o.name for o in response.outputs] == ["probabilities"]
    assert result.as_numpy("logits") is None
    assert result.as_numpy("probabilities").argmax() == 4


def test_infer_typed_contents_equals_raw(stub, client, spec):
    x = np.stack([Preprocessor(spec, 10**7)(data).x for data in PNGS[:3]])
    fp32 = service_pb2.ModelInferRequest(model_name="default", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=list(x.shape),
        contents=service_pb2.InferTensorContents(fp32_contents=x.ravel().tolist()))])
    images = service_pb2.ModelInferRequest(model_name="default", inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="BYTES", shape=[3],
                                                       contents=service_pb2.InferTensorContents(bytes_contents=PNGS[:3]))])
    raw = client.infer("default", [image_input(PNGS[:3])]).as_numpy("probabilities")
    for request in (fp32, images):
        response = stub.ModelInfer(request, timeout=30)
        names = [o.name for o in response.outputs]
        probs = np.frombuffer(response.raw_output_contents[names.index("probabilities")], "<f4").reshape(3, 10)
        np.testing.assert_allclose(probs, raw, rtol=0, atol=1e-6)


def test_infer_classification_gives_top_classes_as_triton_does(client):
    result = client.infer("default", [image_input(PNGS[:2])], outputs=[
        triton.InferRequestedOutput("probabilities", class_count=3)])
    top = result.as_numpy("probabilities")  # (2, 3) BYTES "<value>:<index>:<label>"
    probs = client.infer("default", [image_input(PNGS[:2])]).as_numpy("probabilities")
    assert top.shape == (2, 3)
    for row, p in zip(top, probs, strict=True):
        fields = [e.decode().split(":") for e in row]
        assert [int(i) for _, i, _ in fields] == list(np.argsort(-p)[:3])
        assert [label for _, _, label in fields] == [str(int(i)) for _, i, _ in fields]  # the digits' labels
        np.testing.assert_allclose([float(v) for v, _, _ in fields], np.sort(p)[::-1][:3], atol=1e-6)


def test_infer_gzip_compressed_request_and_response(client):
    plain = client.infer("default", [image_input(PNGS)]).as_numpy("probabilities")
    packed = client.infer("default", [image_input(PNGS)], compression_algorithm="gzip").as_numpy("probabilities")
    np.testing.assert_array_equal(packed, plain)


@pytest.mark.parametrize(
    ("rest", "grpc_call", "message"),
    [
        pytest.param(("POST", "/v2/repository/index"), lambda c: c.get_model_repository_index(),
                     lambda body: service_pb2.RepositoryIndexResponse(models=[
                         service_pb2.RepositoryIndexResponse.ModelIndex(**m) for m in body]), id="repository-index"),
        pytest.param(("GET", "/v2/models/default/config"), lambda c: c.get_model_config("default"),
                     lambda body: json_format.ParseDict({"config": body}, service_pb2.ModelConfigResponse()),
                     id="model-config"),
        pytest.param(("GET", "/v2/models/default/stats"), lambda c: c.get_inference_statistics("default"),
                     lambda body: json_format.ParseDict(body, service_pb2.ModelStatisticsResponse()), id="statistics"),
    ],
)
def test_triton_extension_over_grpc_equals_rest(client, http, rest, grpc_call, message):
    client.infer("default", [image_input(PNGS[:2])])  # statistics with something in them
    answer = grpc_call(client)
    r = http.request(*rest)
    assert r.status_code == 200, r.text
    assert answer == message(r.json())


# --- errors ---------------------------------------------------------------------------------------------------------

BYTES_1 = {"datatype": "BYTES", "shape": [1]}


def raw_request(inputs: list[dict], raw: list[bytes], model: str = "default", version: str = "", **fields
                ) -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest(
        model_name=model, model_version=version, raw_input_contents=raw,
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(**{"name": "input", **i}) for i in inputs], **fields)


def framed(*elements: bytes) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        pytest.param(raw_request([BYTES_1], [framed(PNGS[0])], model="resnet"), "NOT_FOUND", "unknown model 'resnet'",
                     id="unknown-model"),
        pytest.param(raw_request([BYTES_1], [framed(PNGS[0])], version="1"), "NOT_FOUND",
                     "unknown version '1' of model 'default'", id="unknown-version"),
        pytest.param(raw_request([BYTES_1], [framed(b"not an image")]), "INVALID_ARGUMENT", "could not decode image",
                     id="bad-image"),
        pytest.param(raw_request([BYTES_1], [framed(bomb_png())]), "INVALID_ARGUMENT", "image has too many pixels",
                     id="decompression-bomb"),
        pytest.param(raw_request([{"datatype": "FP32", "shape": [1, 1, 32, 32]}], [b"\0" * 100]), "INVALID_ARGUMENT",
                     "input 'input': FP32 [1, 1, 32, 32] is 4096 bytes, got 100", id="fp32-short"),
        pytest.param(raw_request([{"datatype": "FP32", "shape": [2**62, 1, 32, 32]}], [b"\0" * 4096]),
                     "INVALID_ARGUMENT", "is 18889465931478580854784 bytes, got 4096", id="huge-declared-shape"),
        pytest.param(raw_request([{"datatype": "FP32", "shape": [1, 3, 32, 32]}], [b"\0" * 12288]),
                     "INVALID_ARGUMENT", "FP32 shape must be [N, 1, 32, 32], got [1, 3, 32, 32]", id="wrong-shape"),
        pytest.param(raw_request([{"datatype": "FP32", "shape": [-1, 1, 32, 32]}], [b"\0" * 4096]),
                     "INVALID_ARGUMENT", "invalid inputs.0.shape.0: Input should be greater than or equal to 0",
                     id="negative-dim"),
        pytest.param(raw_request([{"datatype": "INT64", "shape": [1, 1, 32, 32]}], [b"\0" * 8192]),
                     "INVALID_ARGUMENT", "datatype 'INT64' is not accepted", id="wrong-datatype"),
        pytest.param(raw_request([{"datatype": "FP32", "shape": [1, 1, 32, 32]}],
                                 [np.full(1024, np.nan, "<f4").tobytes()]),
                     "INVALID_ARGUMENT", "data holds NaN or infinity", id="nan"),
        pytest.param(raw_request([{"datatype": "BYTES", "shape": [2]}], [framed(PNGS[0])]), "INVALID_ARGUMENT",
                     "shape [2] but 1 BYTES elements", id="bytes-count-lies"),
        pytest.param(raw_request([BYTES_1], [b"\xff\xff\xff\x7f" + PNGS[0]]), "INVALID_ARGUMENT",
                     "element 0 runs past the end of the tensor", id="bytes-length-lies"),
        pytest.param(raw_request([{"datatype": "BYTES", "shape": [17]}], [framed(*[PNGS[0]] * 17)]),
                     "INVALID_ARGUMENT", "too many images in one request", id="too-many-images"),
        pytest.param(raw_request([BYTES_1, {"name": "extra", **BYTES_1}], [framed(PNGS[0])] * 2), "INVALID_ARGUMENT",
                     "takes one input, got 2", id="two-inputs"),
        pytest.param(raw_request([BYTES_1], []), "INVALID_ARGUMENT", "shape [1] but 0 BYTES elements", id="no-data"),
        pytest.param(raw_request([BYTES_1], [framed(PNGS[0])] * 2), "INVALID_ARGUMENT",
                     "2 raw_input_contents for 1 inputs", id="raw-count-lies"),
        pytest.param(raw_request([{**BYTES_1, "contents": service_pb2.InferTensorContents(fp32_contents=[1.0])}],
                                 []), "INVALID_ARGUMENT",
                     "BYTES data goes in contents.bytes_contents, got fp32_contents", id="contents-wrong-type"),
        pytest.param(raw_request([{**BYTES_1, "contents": service_pb2.InferTensorContents(bytes_contents=[PNGS[0]])}],
                                 [framed(PNGS[0])]), "INVALID_ARGUMENT", "send one or the other",
                     id="contents-and-raw"),
        pytest.param(raw_request([BYTES_1], [framed(PNGS[0])],
                                 outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="embedding")]),
                     "INVALID_ARGUMENT", "unknown output 'embedding'", id="unknown-output"),
        pytest.param(raw_request([BYTES_1], [framed(PNGS[0])], outputs=[
            service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="logits", parameters={
                "classification": service_pb2.InferParameter(string_param="three")})]),
                     "INVALID_ARGUMENT", "invalid outputs.0.parameters.classification", id="classification-not-int"),
        pytest.param(raw_request([BYTES_1], [b"\0" * 300_000]), "RESOURCE_EXHAUSTED",
                     "Received message larger than max", id="message-over-upload-limit"),
    ],
)
def test_bad_infer_gets_clear_status_and_service_keeps_serving(stub, client, request_, code, message):
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request_, timeout=30)
    assert e.value.code().name == code, e.value.details()
    assert message in e.value.details(), e.value.details()
    assert client.infer("default", [image_input(PNGS[:1])]).as_numpy("probabilities").argmax() == 0


def test_malformed_protobufs_never_internal(server, client):
    """Random bytes, truncations and bit flips of a valid request: a clear status, never INTERNAL or UNKNOWN."""
    valid = raw_request([BYTES_1], [framed(PNGS[0])]).SerializeToString()
    rng = random.Random(0)
    bodies = [b"\xff" * 8, b"\x0a\xff\xff\xff\xff\x0f", valid[:len(valid) // 2]]
    bodies += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(100)]
    for _ in range(100):
        flipped = bytearray(valid)
        for _ in range(rng.randrange(1, 6)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        bodies.append(bytes(flipped))
    codes: dict[str, int] = {}
    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.unary_unary(f"/{SERVICE}/ModelInfer")  # bytes in, bytes out: no serializer to refuse them
        for body in bodies:
            try:
                call(body, timeout=30)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as e:
                assert e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (body, e.details())
                assert e.details(), body
                codes[e.code().name] = codes.get(e.code().name, 0) + 1
    assert codes.get("INVALID_ARGUMENT", 0) + codes.get("NOT_FOUND", 0) > 100, codes
    assert client.is_server_ready()


# --- health, reflection, metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "status"),
    [pytest.param("", "SERVING", id="server"), pytest.param(SERVICE, "SERVING", id="inference-service")],
)
def test_grpc_health_check_serving_when_ready(server, service, status):
    with grpc.insecure_channel(server.grpc) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert health_pb2.HealthCheckResponse.ServingStatus.Name(response.status) == status


def test_grpc_health_check_unknown_service_not_found(server):
    with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as e:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()


def test_reflection_lists_the_services(server):
    with grpc.insecure_channel(server.grpc) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names, names


def test_metrics_count_grpc_calls_by_method_and_code(client, stub, http):
    def count(method: str, code: str) -> float:
        text = http.get("/metrics").text
        found = re.search(rf'grpc_requests_total{{code="{code}",method="{method}"}} ([0-9.e+]+)', text)
        return float(found.group(1)) if found else 0.0

    ok, not_found = count("ModelInfer", "OK"), count("ModelInfer", "NOT_FOUND")
    client.infer("default", [image_input(PNGS[:1])])
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(raw_request([BYTES_1], [framed(PNGS[0])], model="resnet"), timeout=30)
    assert count("ModelInfer", "OK") == ok + 1
    assert count("ModelInfer", "NOT_FOUND") == not_found + 1


# --- KServe's own clients ------------------------------------------------------------------------------------------

KSERVE = """
import asyncio, base64, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

grpc_url, rest_url, images = sys.argv[1], sys.argv[2], [base64.b64decode(i) for i in json.loads(sys.stdin.read())]

def request():
    inp = InferInput("input", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    return InferRequest(model_name="default", infer_inputs=[inp])

async def main():
    out = {}
    g = InferenceGRPCClient(grpc_url)
    out["grpc_ready"] = [await g.is_server_ready(), await g.is_model_ready("default")]
    res = await g.infer(request())
    out["grpc"] = res.get_output_by_name("probabilities").as_numpy().tolist()
    await g.close()
    r = InferenceRESTClient(RESTConfig(protocol="v2"))
    out["rest_ready"] = [await r.is_server_ready(rest_url), await r.is_model_ready(rest_url, "default")]
    res = await r.infer(rest_url, request(), model_name="default")
    out["rest"] = res.get_output_by_name("probabilities").as_numpy().tolist()
    await r.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_kserve_clients_infer_and_check_readiness(server, client):
    """KServe's InferenceGRPCClient and InferenceRESTClient (kserve 0.21's clients have no metadata call). In their
    own process: kserve's generated messages and tritonclient's define the same protobuf names."""
    import base64

    r = subprocess.run([sys.executable, "-c", textwrap.dedent(KSERVE), server.grpc, server.url], cwd=ROOT,
                       input=json.dumps([base64.b64encode(p).decode() for p in PNGS[:3]]), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["grpc_ready"] == [True, True] and out["rest_ready"] == [True, True], out
    expected = client.infer("default", [image_input(PNGS[:3])]).as_numpy("probabilities")
    np.testing.assert_allclose(np.array(out["grpc"]), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(out["rest"]), expected, rtol=0, atol=1e-6)


# --- API keys -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> Iterator[triton.InferenceServerClient]:
    for s in grpc_server(tmp_path_factory, "grpc-keyed", RESNET_API_KEYS=KEY):
        c = triton.InferenceServerClient(s.grpc)
        yield c
        c.close()


BEARER = {"authorization": f"Bearer {KEY}"}
WRONG = {"authorization": "Bearer not-the-key-0123456789"}


@pytest.mark.parametrize(
    ("call", "open_"),
    [
        pytest.param(lambda c, h: c.is_server_live(headers=h), True, id="live-open"),
        pytest.param(lambda c, h: c.is_server_ready(headers=h), True, id="ready-open"),
        pytest.param(lambda c, h: c.get_server_metadata(headers=h), False, id="server-metadata"),
        pytest.param(lambda c, h: c.get_model_metadata("default", headers=h), False, id="model-metadata"),
        pytest.param(lambda c, h: c.get_model_config("default", headers=h), False, id="model-config"),
        pytest.param(lambda c, h: c.get_inference_statistics("default", headers=h), False, id="statistics"),
        pytest.param(lambda c, h: c.get_model_repository_index(headers=h), False, id="repository-index"),
        pytest.param(lambda c, h: c.get_model_metadata("resnet", headers=h), False, id="unknown-model-hidden"),
        pytest.param(lambda c, h: c.infer("default", [image_input(PNGS[:1])], headers=h), False, id="infer"),
    ],
)
def test_grpc_with_api_keys_requires_bearer_except_health(keyed, call, open_):
    if open_:
        assert call(keyed, None)
        return
    for headers in (None, WRONG):
        status, message = code_of(lambda h=headers: call(keyed, h))
        assert (status, message) == ("StatusCode.UNAUTHENTICATED", "missing or invalid API key")
    try:
        call(keyed, BEARER)
    except InferenceServerException as e:  # with the key, only an unknown model is refused, and as such
        assert e.status() == "StatusCode.NOT_FOUND", e.message()


# --- not ready, deadlines, cancellation, queue full, drain ---------------------------------------------------------


def test_not_ready_server_unavailable_on_infer_and_not_serving(tmp_path):
    port = free_port()
    server = start_service({"RESNET_GRPC_PORT": str(port), "RESNET_MODEL_PATH": str(tmp_path / "missing.onnx")},
                        tmp_path / "server.log")
    try:
        c = triton.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:  # live, and never ready: the model file is missing
            try:
                if c.is_server_live():
                    break
            except InferenceServerException:
                assert time.monotonic() < deadline, server.log_path.read_text()
                time.sleep(0.1)
        assert not c.is_server_ready()
        code, message = code_of(lambda: c.infer("default", [image_input(PNGS[:1])]))
        assert code == "StatusCode.UNAVAILABLE", message
        assert message.startswith("model failed to load: model file not found") and "missing.onnx" in message, message
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop()


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> Iterator[LiveServer]:
    """One image per session.run on one thread: a request of many images stays queued long enough to cancel."""
    yield from grpc_server(tmp_path_factory, "grpc-slow", RESNET_MAX_BATCH_SIZE="1", RESNET_INTRA_OP_THREADS="1",
                           RESNET_MAX_BATCH_IMAGES="256", RESNET_MAX_QUEUE="256", RESNET_MAX_BATCH_DELAY_MS="0",
                           RESNET_REQUEST_TIMEOUT_MS="60000")


def statistics(c: triton.InferenceServerClient) -> dict:
    return c.get_inference_statistics("default", as_json=True)["model_stats"][0]


def settled_count(c: triton.InferenceServerClient) -> int:
    """inference_count once it stops moving (the batches already running have finished)."""
    last = int(statistics(c).get("inference_count", 0))
    while True:
        time.sleep(0.3)
        now = int(statistics(c).get("inference_count", 0))
        if now == last:
            return now
        last = now


BATCH = [PNGS[0]] * 256


def test_client_deadline_exceeded_leaves_nothing_queued(slow):
    c = triton.InferenceServerClient(slow.grpc)
    before = settled_count(c)
    fails = int(statistics(c)["inference_stats"]["fail"].get("count", 0))
    status, _ = code_of(lambda: c.infer("default", [image_input(BATCH)], client_timeout=0.05))
    assert status == "StatusCode.DEADLINE_EXCEEDED"
    after = settled_count(c)
    assert after - before < len(BATCH), (before, after)  # the rest was dropped, not run
    assert int(statistics(c)["inference_stats"]["fail"]["count"]) == fails + 1
    assert c.infer("default", [image_input(PNGS[:1])]).as_numpy("probabilities").argmax() == 0


def test_cancelled_aio_call_leaves_nothing_queued(slow):
    c = triton.InferenceServerClient(slow.grpc)
    before = settled_count(c)

    async def cancel() -> None:
        async with triton_aio.InferenceServerClient(slow.grpc) as ac:
            task = asyncio.ensure_future(ac.infer("default", [image_input(BATCH)]))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(cancel())
    after = settled_count(c)
    assert after - before < len(BATCH), (before, after)
    assert c.infer("default", [image_input(PNGS[:1])]).as_numpy("probabilities").argmax() == 0


def test_server_deadline_exceeded(tmp_path_factory):
    for s in grpc_server(tmp_path_factory, "grpc-deadline", RESNET_MAX_BATCH_SIZE="1", RESNET_INTRA_OP_THREADS="1",
                         RESNET_MAX_BATCH_IMAGES="256", RESNET_MAX_QUEUE="256", RESNET_REQUEST_TIMEOUT_MS="20"):
        c = triton.InferenceServerClient(s.grpc)
        status = code_of(lambda c=c: c.infer("default", [image_input(BATCH)]))
        assert status == ("StatusCode.DEADLINE_EXCEEDED", "request timed out")


def test_queue_full_resource_exhausted(slow):
    async def both() -> list:
        async with triton_aio.InferenceServerClient(slow.grpc) as ac:
            first = asyncio.ensure_future(ac.infer("default", [image_input(BATCH)]))
            await asyncio.sleep(0.05)  # the first still holds most of the queue: no room for another as large
            second = await asyncio.gather(ac.infer("default", [image_input(BATCH)]), return_exceptions=True)
            await first
            return second

    (error,) = asyncio.run(both())
    assert isinstance(error, InferenceServerException), error
    assert (error.status(), error.message()) == ("StatusCode.RESOURCE_EXHAUSTED",
                                                 "server busy: inference queue is full")


def test_sigterm_drains_grpc_call_in_flight(tmp_path):
    port = free_port()
    server = start_service({"RESNET_GRPC_PORT": str(port), "RESNET_MAX_BATCH_SIZE": "1", "RESNET_INTRA_OP_THREADS": "1",
                         "RESNET_MAX_BATCH_IMAGES": "128", "RESNET_MAX_QUEUE": "128"}, tmp_path / "server.log")
    try:
        server.wait_ready()

        async def infer_through_sigterm() -> np.ndarray:
            async with triton_aio.InferenceServerClient(f"127.0.0.1:{port}") as ac:
                call = asyncio.ensure_future(ac.infer("default", [image_input(BATCH[:128])]))
                await asyncio.sleep(0.05)
                server.proc.send_signal(signal.SIGTERM)
                return (await call).as_numpy("probabilities")

        probs = asyncio.run(infer_through_sigterm())
        assert probs.shape == (128, 10) and set(probs.argmax(axis=1)) == {0}
        assert server.proc.wait(60) == 0, server.log_path.read_text()[-2000:]
    finally:
        server.stop()


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` or its children (a supervisor's workers) listen on (Linux: their socket inodes,
    looked up in /proc/net/tcp{,6})."""
    from pathlib import Path

    pids = {pid}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.add(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    inodes = set().union(*(socket_inodes(p) for p in pids))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_grpc_port_zero_turns_the_door_off(tmp_path):
    server = start_service({"RESNET_GRPC_PORT": "0", "RESNET_WORKERS": "1"}, tmp_path / "server.log")
    try:
        server.wait_ready()
        assert listening_ports(server.proc.pid) == {server.port}
    finally:
        server.stop()


def test_grpc_port_set_listens_beside_http(server):
    assert listening_ports(server.proc.pid) == {server.port, int(server.grpc.rsplit(":", 1)[1])}


def test_import_core_loads_no_grpc():
    """grpc is the door's: the core, the codec and the lifecycle (which imports the door only to start it) load none."""
    code = ("import sys, service.core, service.protocol, service.lifecycle, service.app; "
            "g = sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'); print(g); sys.exit(1 if g else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_taken_grpc_port_fails_the_start_and_says_which(tmp_path):
    """One worker: under the supervisor a worker that cannot bind is restarted (a taken port is then in its log)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_service({"RESNET_GRPC_PORT": str(port), "RESNET_WORKERS": "1"}, tmp_path / "server.log")
        try:
            assert server.proc.wait(60) != 0
        finally:
            server.stop()
    assert f"Failed to bind to address 127.0.0.1:{port}" in server.log_path.read_text()
