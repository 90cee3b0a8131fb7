"""The Open Inference Protocol (KServe V2): Triton's own HTTP client against the service as a real process,
results held to /predict's, and every malformed request answered 4xx {"error"} while the service keeps serving."""

from __future__ import annotations

import base64
import gzip
import json
import logging
import struct
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient

from bench.harness import Server, serve_service, wait_ready
from service.app import create_app
from service.preprocessing import Preprocessor
from service.protocol import EXTENSIONS
from service.runtime import Model, softmax
from service.settings import Settings
from tests.conftest import loading_after, loading_as
from tests.images import bomb_png, encode, one_per_class

HEADER = "Inference-Header-Content-Length"
INFER = "/v2/models/default/infer"
PNG = encode(one_per_class()[1][0], "PNG")
ZEROS = np.zeros((1, 1, 32, 32), np.float32)
LIMITS = {"max_upload_bytes": 400_000, "max_batch_images": 16, "max_batch_size": 8}
KEY = "v2-test-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """One ``python -m service`` for the module (the ``live_server`` fixture starts one per test)."""
    env = {f"RESNET_{k.upper()}": str(v) for k, v in LIMITS.items()}
    with serve_service(env, tmp_path_factory.mktemp("v2") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return [encode(img, "PNG") for img, _ in one_per_class()]


@pytest.fixture(scope="module")
def predicted(http, pngs) -> np.ndarray:
    """/predict's probabilities for the same images: (10, 10), one digit per class."""
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]
    r = http.post("/predict", files=files)
    assert r.status_code == 200, r.text
    return np.array([p["probabilities"] for p in r.json()["predictions"]])


# --- health and metadata, through tritonclient ----------------------------------------------------------------------


def test_server_health_and_metadata_via_tritonclient(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata() == {"name": "resnet-serve", "version": "0.1.0",
                                            "extensions": EXTENSIONS}


@pytest.mark.parametrize(
    ("name", "version", "ready"),
    [
        pytest.param("default", "", True, id="served"),
        pytest.param("default", "served-version", True, id="served-version"),
        pytest.param("resnet", "", False, id="unknown-model"),
        pytest.param("default", "1", False, id="unknown-version"),
    ],
)
def test_model_ready_via_tritonclient(client, spec, name, version, ready):
    version = spec.version if version == "served-version" else version
    assert client.is_model_ready(name, version) is ready


@pytest.mark.parametrize("versioned", [pytest.param(False, id="unversioned"), pytest.param(True, id="versioned")])
def test_model_metadata_via_tritonclient(client, spec, versioned):
    meta = client.get_model_metadata("default", spec.version if versioned else "")
    assert meta == {
        "name": "default", "versions": [spec.version], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }


# --- inference, through tritonclient --------------------------------------------------------------------------------

TRANSPORTS = [
    pytest.param(True, None, id="client-defaults"),  # binary input, all outputs, binary_data_output: true
    pytest.param(True, True, id="binary-in-binary-out"),
    pytest.param(False, False, id="json-in-json-out"),
    pytest.param(True, False, id="binary-in-json-out"),
    pytest.param(False, True, id="json-in-binary-out"),
]


def infer(client: triton.InferenceServerClient, inp: triton.InferInput, binary_output: bool | None
          ) -> triton.InferResult:
    outputs = None if binary_output is None else [
        triton.InferRequestedOutput(name, binary_data=binary_output) for name in ("logits", "probabilities")]
    return client.infer("default", [inp], outputs=outputs)


def assert_equals_predict(result: triton.InferResult, predicted: np.ndarray, binary_output: bool | None) -> None:
    for name in ("logits", "probabilities"):
        out = result.get_output(name)
        assert out["shape"] == [10, 10] and out["datatype"] == "FP32", out
        assert ("binary_data_size" in out.get("parameters", {})) is (binary_output is not False), out
    np.testing.assert_allclose(result.as_numpy("probabilities"), predicted, rtol=0, atol=1e-6)
    np.testing.assert_allclose(softmax(result.as_numpy("logits")), predicted, rtol=0, atol=1e-6)
    assert list(result.as_numpy("probabilities").argmax(axis=1)) == list(range(10))


@pytest.mark.parametrize(("binary_input", "binary_output"), TRANSPORTS)
def test_infer_fp32_equals_predict(client, spec, pngs, predicted, binary_input, binary_output):
    preprocess = Preprocessor(spec, 10**7)
    x = np.stack([preprocess(data).x for data in pngs])  # (10, 1, 32, 32): what /predict feeds the model
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_input)
    assert_equals_predict(infer(client, inp, binary_output), predicted, binary_output)


@pytest.mark.parametrize(("binary_input", "binary_output"), TRANSPORTS)
def test_infer_encoded_images_equals_predict(client, pngs, predicted, binary_input, binary_output):
    # JSON carries BYTES as UTF-8 strings, which an image is not: there, each element is base64.
    elements = pngs if binary_input else [base64.b64encode(data) for data in pngs]
    inp = triton.InferInput("input", [len(pngs)], "BYTES")
    inp.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary_input)
    assert_equals_predict(infer(client, inp, binary_output), predicted, binary_output)


def test_infer_echoes_id_and_returns_only_requested_outputs(client, spec, pngs, predicted):
    inp = triton.InferInput("input", [1], "BYTES")
    inp.set_data_from_numpy(np.array(pngs[4:5], dtype=np.object_))
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer("default", [inp], outputs=outputs, request_id="req-42")
    body = result.get_response()
    assert body["id"] == "req-42" and body["model_name"] == "default" and body["model_version"] == spec.version
    assert [o["name"] for o in body["outputs"]] == ["probabilities"]
    assert result.as_numpy("logits") is None
    np.testing.assert_allclose(result.as_numpy("probabilities"), predicted[4:5], rtol=0, atol=1e-6)


# --- the wire format and errors, without the client -------------------------------------------------------------------


def infer_request(inputs: list[dict], blob: bytes = b"", header_length: int | None = None, **fields) -> dict:
    """httpx keyword arguments for an inference request: the JSON header, then ``blob`` (binary tensor data)."""
    header = json.dumps({"inputs": inputs, **fields}).encode()
    headers = {}
    if blob or header_length is not None:
        headers[HEADER] = str(len(header) if header_length is None else header_length)
    return {"content": header + blob, "headers": headers}


def tensor(name: str = "input", datatype: str = "FP32", shape: tuple = (1, 1, 32, 32), **fields) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), **fields}


def binary(blob: bytes, **kw) -> dict:
    return tensor(parameters={"binary_data_size": len(blob)}, **kw)


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def test_infer_binary_response_framed_per_extension(http, spec, predicted):
    x = Preprocessor(spec, 10**7)(PNG).x[None]
    outputs = [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "logits"}]
    r = http.post(INFER, **infer_request([binary(x.tobytes())], x.tobytes(), id="7", outputs=outputs))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    length = int(r.headers[HEADER])
    body = json.loads(r.content[:length])
    assert body["id"] == "7"
    assert body["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [1, 10],
                                  "parameters": {"binary_data_size": 40}}
    assert body["outputs"][1]["name"] == "logits" and len(body["outputs"][1]["data"]) == 10
    probabilities = np.frombuffer(r.content[length:], "<f4")
    assert probabilities.shape == (10,)
    np.testing.assert_allclose(probabilities, predicted[1], rtol=0, atol=1e-6)


def test_infer_json_response_is_plain_json(http, predicted):
    elements = [base64.b64encode(PNG).decode()]
    r = http.post(INFER, **infer_request([tensor(datatype="BYTES", shape=(1,), data=elements)]))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json" and HEADER.lower() not in r.headers
    assert [o["name"] for o in r.json()["outputs"]] == ["logits", "probabilities"]
    np.testing.assert_allclose(r.json()["outputs"][1]["data"], predicted[1], rtol=0, atol=1e-6)


def test_infer_accepts_nested_json_data(http, spec, predicted):
    x = Preprocessor(spec, 10**7)(PNG).x[None]
    r = http.post(INFER, **infer_request([tensor(data=x.tolist())]))  # [[[[...]]]], not flat
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["outputs"][1]["data"], predicted[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "path", "request_kwargs", "status", "error"),
    [
        pytest.param("POST", INFER, infer_request([binary(b"\0" * 12288, shape=(1, 3, 32, 32))], b"\0" * 12288), 400,
                     "input 'input': FP32 shape must be [N, 1, 32, 32], got [1, 3, 32, 32]", id="wrong-shape"),
        pytest.param("POST", INFER, infer_request([tensor(datatype="INT32", data=[0] * 1024)]), 400,
                     "input 'input': datatype 'INT32' is not accepted: send FP32 (preprocessed, [N, C, H, W]) or "
                     "BYTES (encoded images, [N])", id="wrong-datatype"),
        pytest.param("POST", INFER, infer_request([tensor(datatype="BYTES", shape=(1, 1), data=["x"])]), 400,
                     "input 'input': BYTES holds one encoded image per element, shape [N]; got [1, 1]",
                     id="bytes-wrong-shape"),
        pytest.param("POST", INFER, infer_request([tensor(name="images", data=[0.0] * 1024)]), 400,
                     "unknown input 'images': model 'default' takes 'input'", id="wrong-input-name"),
        pytest.param("POST", INFER, infer_request([tensor(data=[0.0] * 1024)] * 2), 400,
                     "model 'default' takes one input, got 2", id="two-inputs"),
        pytest.param("POST", "/v2/models/resnet/infer", infer_request([tensor(data=[0.0] * 1024)]), 404,
                     "unknown model 'resnet'", id="unknown-model"),
        pytest.param("POST", "/v2/models/default/versions/1/infer", infer_request([tensor(data=[0.0] * 1024)]), 404,
                     "unknown version '1' of model 'default'", id="unknown-version"),
        pytest.param("GET", "/v2/models/resnet", {}, 404, "unknown model 'resnet'", id="unknown-model-metadata"),
        pytest.param("GET", "/v2/models/default/versions/1", {}, 404, "unknown version '1' of model 'default'",
                     id="unknown-version-metadata"),
        pytest.param("GET", "/v2/models/default/trace/setting", {}, 404, "Not Found", id="unknown-path"),
        pytest.param("GET", INFER, {}, 405, "Method Not Allowed", id="infer-with-get"),
        pytest.param("POST", INFER, infer_request([binary(b"\0" * 4096)], b"\0" * 100), 400,
                     "input 'input' has binary_data_size 4096, but 100 bytes follow the JSON header",
                     id="binary-size-mismatch"),
        pytest.param("POST", INFER, infer_request([tensor(data=[0.0] * 1024)], b"\0" * 8), 400,
                     "8 bytes follow the JSON header, but no input has binary_data_size", id="binary-undeclared"),
        pytest.param("POST", INFER, {"content": b'{"inputs": []}', "headers": {HEADER: "1000"}}, 400,
                     "Inference-Header-Content-Length is 1000 but the body has 14 bytes", id="header-length-past-body"),
        pytest.param("POST", INFER, {"content": b'{"inputs": []}', "headers": {HEADER: "5"}}, 400,
                     "invalid request: Invalid JSON: EOF while parsing a string at line 1 column 5",
                     id="header-length-cuts-json"),
        pytest.param("POST", INFER, {"content": b"{}", "headers": {HEADER: "two"}}, 400,
                     "invalid inference-header-content-length: Input should be a valid integer, unable to parse "
                     "string as an integer", id="header-length-not-a-number"),
        pytest.param("POST", INFER, {"content": ZEROS.tobytes(), "headers": {HEADER: "0"}}, 400,
                     "Inference-Header-Content-Length: 0 (a raw binary request) is not supported: send a JSON header",
                     id="raw-binary-request"),
        pytest.param("POST", INFER, {"content": b"not json"}, 400,
                     "invalid request: Invalid JSON: expected ident at line 1 column 2", id="not-json"),
        pytest.param("POST", INFER, {"content": b"{}"}, 400, "invalid inputs: Field required", id="no-inputs"),
        pytest.param("POST", INFER, infer_request([tensor(shape=(-1, 1, 32, 32), data=[0.0] * 1024)]), 400,
                     "invalid inputs.0.shape.0: Input should be greater than or equal to 0", id="negative-dimension"),
        pytest.param("POST", INFER, infer_request([tensor(data=[0.0] * 10)]), 400,
                     "input 'input': shape [1, 1, 32, 32] holds 1024 values, data has 10", id="too-few-values"),
        pytest.param("POST", INFER, infer_request([tensor(data=["0"] * 1024)]), 400,
                     "input 'input': FP32 data must be numbers", id="strings-as-fp32"),
        pytest.param("POST", INFER, infer_request([tensor(data=[[0.0] * 1000, [0.0] * 24])]), 400,
                     "input 'input': data is not a regular array", id="ragged-data"),
        pytest.param("POST", INFER, infer_request([tensor()]), 400,
                     "input 'input' has neither data nor binary_data_size", id="no-data"),
        pytest.param("POST", INFER, infer_request([binary(np.full_like(ZEROS, np.nan).tobytes())],
                                                  np.full_like(ZEROS, np.nan).tobytes()), 400,
                     "input 'input': data holds NaN or infinity", id="nan"),
        pytest.param("POST", INFER, infer_request([binary(np.full_like(ZEROS, 3e38).tobytes())],
                                                  np.full_like(ZEROS, 3e38).tobytes()), 400,
                     "the model's output for this input is not finite", id="output-overflows"),
        pytest.param("POST", INFER, infer_request([binary(ZEROS.tobytes(), shape=(0, 1, 32, 32))], ZEROS.tobytes()),
                     400, "input 'input': the batch is empty", id="empty-batch"),
        pytest.param("POST", INFER, infer_request([binary(b"\0" * 69632, shape=(17, 1, 32, 32))], b"\0" * 69632), 413,
                     "too many images in one request: limit 16 (RESNET_MAX_BATCH_IMAGES)", id="too-many-tensors"),
        pytest.param("POST", INFER, infer_request([binary(bytes_tensor(*[PNG] * 17), datatype="BYTES", shape=(17,))],
                                                  bytes_tensor(*[PNG] * 17)), 413,
                     "too many images in one request: limit 16 (RESNET_MAX_BATCH_IMAGES)", id="too-many-images"),
        pytest.param("POST", INFER, {"content": b"{" + b" " * 400_000}, 413,
                     "body too large: limit 400000 bytes (RESNET_MAX_UPLOAD_BYTES)", id="body-over-limit"),
        pytest.param("POST", INFER, infer_request([binary(struct.pack("<I", 1000) + b"\x89PNG", datatype="BYTES",
                                                          shape=(1,))], struct.pack("<I", 1000) + b"\x89PNG"), 400,
                     "input 'input': malformed BYTES data: element 0 runs past the end of the tensor",
                     id="bytes-length-past-end"),
        pytest.param("POST", INFER, infer_request([binary(bytes_tensor(PNG) + b"\1\0", datatype="BYTES", shape=(1,))],
                                                  bytes_tensor(PNG) + b"\1\0"), 400,
                     "input 'input': malformed BYTES data: element 1 runs past the end of the tensor",
                     id="bytes-truncated-length"),
        pytest.param("POST", INFER, infer_request([binary(bytes_tensor(PNG, PNG), datatype="BYTES", shape=(1,))],
                                                  bytes_tensor(PNG, PNG)), 400,
                     "input 'input': shape [1] but 2 BYTES elements", id="bytes-count-mismatch"),
        pytest.param("POST", INFER, infer_request([tensor(datatype="BYTES", shape=(1,), data=["not base64!"])]), 400,
                     "input 'input': BYTES data in JSON must be base64 strings of encoded images",
                     id="bytes-not-base64"),
        pytest.param("POST", INFER, infer_request([tensor(datatype="BYTES", shape=(1,), data=["aGVsbG8="])]), 400,
                     "could not decode image", id="bytes-not-an-image"),
        pytest.param("POST", INFER, infer_request([binary(bytes_tensor(bomb_png()), datatype="BYTES", shape=(1,))],
                                                  bytes_tensor(bomb_png())), 413,
                     "image has too many pixels: limit 40000000 (width x height, RESNET_MAX_IMAGE_PIXELS)",
                     id="decompression-bomb"),
        pytest.param("POST", INFER, infer_request([tensor(data=[0.0] * 1024)], outputs=[{"name": "embedding"}]), 400,
                     "unknown output 'embedding': the model gives logits, probabilities", id="unknown-output"),
        pytest.param("POST", INFER, infer_request([tensor(data=[0.0] * 1024)],
                                                  outputs=[{"name": "logits", "parameters": {"classification": -1}}]),
                     400, "invalid outputs.0.parameters.classification: Input should be greater than or equal to 0",
                     id="classification-negative"),
        pytest.param("POST", INFER, {"content": json.dumps({"inputs": [tensor(data=[0.0] * 1024)]}).encode(),
                                     "headers": {"content-encoding": "br"}},
                     415, "unsupported Content-Encoding: send gzip, deflate or identity", id="brotli-body"),
        pytest.param("POST", INFER, {"content": gzip.compress(json.dumps({"inputs": [tensor(data=[0.0] * 1024)]})
                                                              .encode())[:-12],
                                     "headers": {"content-encoding": "gzip"}},
                     400, "the body does not inflate: malformed or truncated gzip/deflate data", id="gzip-truncated"),
    ],
)
def test_bad_request_gets_v2_error_and_service_keeps_serving(http, method, path, request_kwargs, status, error):
    r = http.request(method, path, **request_kwargs)
    assert r.status_code == status, r.text
    assert r.json() == {"error": error}
    ok = http.post(INFER, **infer_request([binary(bytes_tensor(PNG), datatype="BYTES", shape=(1,))],
                                          bytes_tensor(PNG)))
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/v2/nothing", {"error": "Not Found"}, id="v2"),
        pytest.param("/nothing", {"detail": "Not Found"}, id="elsewhere"),
        pytest.param("/v2nothing", {"detail": "Not Found"}, id="v2-prefix-only"),
    ],
)
def test_unknown_path_error_shape_follows_protocol(http, path, body):
    r = http.get(path)
    assert r.status_code == 404, r.text
    assert r.json() == body


# --- server states, in process --------------------------------------------------------------------------------------


def serve(default_model, load_model=Model.load, **settings) -> TestClient:
    app = create_app(Settings(model_path=default_model, **LIMITS, **settings), load_model=load_model)
    return TestClient(app, raise_server_exceptions=False)


class TestBeforeReady:
    def test_v2_ready_and_infer_503_live_200_while_loading(self, default_model):
        gate = threading.Event()

        slow_load = loading_after(gate)

        with serve(default_model, load_model=slow_load) as c:
            r = c.get("/v2/health/live")
            assert r.status_code == 200 and r.json() == {"live": True}, r.text
            r = c.get("/v2/health/ready")
            assert r.status_code == 503 and r.json() == {"ready": False}, r.text
            for path in ("/v2/models/default/ready", "/v2/models/default"):
                r = c.get(path)
                assert r.status_code == 503 and r.json() == {"error": "model not ready"}, r.text
            r = c.post(INFER, **infer_request([tensor(data=[0.0] * 1024)]))
            assert r.status_code == 503 and r.json() == {"error": "model not ready"}, r.text
            gate.set()
            wait_ready(c, "/v2/health/ready")
            r = c.get("/v2/models/default/ready")
            assert r.status_code == 200 and r.json() == {"name": "default", "ready": True}, r.text
            r = c.post(INFER, **infer_request([tensor(data=[0.0] * 1024)]))
            assert r.status_code == 200, r.text


def test_infer_unexpected_failure_gives_500_with_logged_error_id_then_serves(default_model, caplog):
    class FailsOnce(Model):
        armed = False

        def run(self, x, alone=False):
            if FailsOnce.armed:
                FailsOnce.armed = False
                raise RuntimeError("injected onnxruntime failure")
            return super().run(x, alone)

    load = loading_as(FailsOnce)

    with serve(default_model, load_model=load) as c:
        wait_ready(c, "/v2/health/ready")
        FailsOnce.armed = True
        with caplog.at_level(logging.ERROR, logger="service"):
            r = c.post(INFER, **infer_request([tensor(data=[0.0] * 1024)]))
        assert r.status_code == 500, r.text
        error_id = r.json()["error_id"]
        assert r.json() == {"error": "inference failed", "error_id": error_id}
        assert any(error_id in rec.getMessage() for rec in caplog.records)
        r = c.post(INFER, **infer_request([tensor(data=[0.0] * 1024)]))
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def keyed(default_model) -> Iterator[TestClient]:
    with serve(default_model, api_keys=[KEY]) as c:
        wait_ready(c, "/v2/health/ready")
        yield c


@pytest.mark.parametrize(
    ("method", "path", "request_kwargs", "without_key", "with_key"),
    [
        pytest.param("GET", "/v2/health/live", {}, 200, 200, id="live-open"),
        pytest.param("GET", "/v2/health/ready", {}, 200, 200, id="ready-open"),
        pytest.param("GET", "/v2", {}, 401, 200, id="server-metadata"),
        pytest.param("GET", "/v2/models/default", {}, 401, 200, id="model-metadata"),
        pytest.param("GET", "/v2/models/default/ready", {}, 401, 200, id="model-ready"),
        pytest.param("GET", "/v2/models/resnet", {}, 401, 404, id="unknown-model-hidden-without-key"),
        pytest.param("POST", INFER, infer_request([tensor(data=[0.0] * 1024)]), 401, 200, id="infer"),
        pytest.param("POST", "/v2/models/default/versions/1/infer", infer_request([tensor(data=[0.0] * 1024)]), 401,
                     404, id="infer-unknown-version"),
    ],
)
def test_v2_with_api_keys_requires_bearer_except_health(keyed, method, path, request_kwargs, without_key, with_key):
    r = keyed.request(method, path, **request_kwargs)
    assert r.status_code == without_key, r.text
    if without_key == 401:
        assert r.json() == {"error": "missing or invalid API key"}
        assert r.headers["www-authenticate"] == "Bearer"
    headers = {**request_kwargs.get("headers", {}), "authorization": f"Bearer {KEY}"}
    r = keyed.request(method, path, **{**request_kwargs, "headers": headers})
    assert r.status_code == with_key, r.text
