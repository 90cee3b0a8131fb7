"""uint8-input export (issue 14 item 4): the file takes the decoder's pixels and normalises them in the graph; the
service hands them over as they are, answering as the float32 file does, and every door says and checks UINT8."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.harness import free_port, serve_service, wait_ready
from contract import ContractError, Tensor, read_spec
from model.config import TrainConfig
from model.export import export
from model.train import train
from service.app import create_app
from service.preprocessing import Preprocessor
from service.settings import Settings
from tests.images import encode, one_per_class, validation_digits

PNGS = [encode(img, "PNG") for img, _ in one_per_class()]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same 1-epoch checkpoint exported twice: float32 input, and uint8 pixels."""
    tmp = tmp_path_factory.mktemp("uint8")
    train(TrainConfig(data="digits", arch="resnet8", image_size=8, epochs=1, batch_size=64, progress=False,
                      out=str(tmp / "run")))
    export(tmp / "run" / "best.pt", tmp / "float.onnx")
    export(tmp / "run" / "best.pt", tmp / "pixels.onnx", uint8_input=True)
    return tmp / "float.onnx", tmp / "pixels.onnx"


@pytest.fixture(scope="module")
def pixel_spec(files):
    from service.runtime import Model

    return Model.load(Settings(model_path=files[1])).spec


@pytest.fixture(scope="module")
def pixels_client(files) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_path=files[1], max_batch_size=8))) as client:
        wait_ready(client)
        yield client


def served_probabilities(client: TestClient, images: list[bytes]) -> np.ndarray:
    r = client.post("/predict", files=[("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)])
    assert r.status_code == 200, r.text
    return np.array([p["probabilities"] for p in r.json()["predictions"]])


def pixels_of(spec, data: bytes) -> np.ndarray:
    return Preprocessor(spec, 10**7)(data).x


def test_export_uint8_input_takes_pixels_and_says_so(files):
    floats, pixels = files
    (inp,) = ort.InferenceSession(pixels, providers=["CPUExecutionProvider"]).get_inputs()
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [1, 8, 8], (inp.type, inp.shape)
    meta = {p.key: json.loads(p.value) for p in onnx.load(pixels).metadata_props}
    assert meta["input_dtype"] == "uint8" and meta["precision"] == "fp32", meta
    assert json.loads({p.key: p.value for p in onnx.load(floats).metadata_props}["input_dtype"]) == "float32"


def test_predict_uint8_input_file_answers_as_the_float32_file(files, pixels_client):
    images = [encode(img, "PNG") for img in validation_digits()[0][:32]]
    with TestClient(create_app(Settings(model_path=files[0], max_batch_size=8))) as floats:
        wait_ready(floats)
        want = served_probabilities(floats, images)
    got = served_probabilities(pixels_client, images)
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()


@pytest.mark.parametrize("precision", [pytest.param({"fp16": True}, id="fp16"),
                                       pytest.param({"int8": True, "max_drop": 1.0}, id="int8")])
def test_export_uint8_input_combines_with_other_precisions(files, tmp_path, precision):
    export(files[0].parent / "run" / "best.pt", tmp_path / "m.onnx", uint8_input=True, **precision)
    (inp,) = ort.InferenceSession(tmp_path / "m.onnx", providers=["CPUExecutionProvider"]).get_inputs()
    assert inp.type == "tensor(uint8)", inp.type
    with TestClient(create_app(Settings(model_path=tmp_path / "m.onnx"))) as client:
        wait_ready(client)
        got = served_probabilities(client, PNGS)
    with TestClient(create_app(Settings(model_path=files[0]))) as client:
        wait_ready(client)
        want = served_probabilities(client, PNGS)
    assert np.abs(got - want).max() < 0.05, np.abs(got - want).max()


def test_preprocessor_hands_a_uint8_model_the_decoded_pixels(files, pixel_spec):
    from service.runtime import Model

    float_spec = Model.load(Settings(model_path=files[0])).spec
    assert (float_spec.input_dtype, pixel_spec.input_dtype) == ("float32", "uint8")
    x, p = pixels_of(float_spec, PNGS[3]), pixels_of(pixel_spec, PNGS[3])
    assert p.dtype == np.uint8 and p.shape == (1, 8, 8), (p.dtype, p.shape)
    mean, std = float_spec.preprocessing.mean[0], float_spec.preprocessing.std[0]
    np.testing.assert_allclose(x, (p / np.float32(255) - mean) / std, atol=1e-6)


def test_v2_metadata_and_config_report_uint8_input(pixels_client):
    r = pixels_client.get("/v2/models/default")
    assert r.status_code == 200, r.text
    assert r.json()["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 1, 8, 8]}], r.json()
    assert [o["datatype"] for o in r.json()["outputs"]] == ["FP32", "FP32"], r.json()
    r = pixels_client.get("/v2/models/default/config")
    assert r.status_code == 200, r.text
    assert r.json()["input"][0]["data_type"] == "TYPE_UINT8", r.json()


def v2_infer(client: TestClient, tensor: dict, binary: bytes | None = None):
    body = json.dumps({"inputs": [{"name": "input", **tensor}], "outputs": [{"name": "probabilities"}]}).encode()
    headers = {"content-type": "application/json"}
    if binary is not None:
        headers["inference-header-content-length"] = str(len(body))
        body += binary
    return client.post("/v2/models/default/infer", content=body, headers=headers)


def test_v2_infer_uint8_tensor_answers_as_the_encoded_image(pixels_client, pixel_spec):
    spec_pixels = pixels_of(pixel_spec, PNGS[4])[None]  # (1, 1, 8, 8)
    want = served_probabilities(pixels_client, [PNGS[4]])
    as_json = v2_infer(pixels_client, {"datatype": "UINT8", "shape": [1, 1, 8, 8],
                                       "data": spec_pixels.ravel().tolist()})
    as_binary = v2_infer(pixels_client, {"datatype": "UINT8", "shape": [1, 1, 8, 8],
                                         "parameters": {"binary_data_size": 64}}, spec_pixels.tobytes())
    for r in (as_json, as_binary):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([r.json()["outputs"][0]["data"]], want, atol=1e-6)


@pytest.mark.parametrize(
    ("tensor", "binary", "error"),
    [
        pytest.param({"datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}, None,
                     "input 'input': datatype 'FP32' is not accepted: send UINT8 (pixels 0..255, normalised by the "
                     "model, [N, C, H, W]) or BYTES (encoded images, [N])", id="fp32-to-uint8-model"),
        pytest.param({"datatype": "UINT8", "shape": [1, 1, 8, 8], "data": [256] * 64}, None,
                     "input 'input': UINT8 data must be integers 0..255", id="above-255"),
        pytest.param({"datatype": "UINT8", "shape": [1, 1, 8, 8], "data": [-1] * 64}, None,
                     "input 'input': UINT8 data must be integers 0..255", id="negative"),
        pytest.param({"datatype": "UINT8", "shape": [1, 1, 8, 8], "data": [0.5] * 64}, None,
                     "input 'input': UINT8 data must be integers 0..255", id="fractions"),
        pytest.param({"datatype": "UINT8", "shape": [1, 1, 8, 8], "data": [0] * 63}, None,
                     "input 'input': shape [1, 1, 8, 8] holds 64 values, data has 63", id="too-few-values"),
        pytest.param({"datatype": "UINT8", "shape": [1, 1, 8, 8], "parameters": {"binary_data_size": 256}},
                     b"\0" * 256, "input 'input': UINT8 [1, 1, 8, 8] is 64 bytes, got 256", id="fp32-sized-binary"),
        pytest.param({"datatype": "UINT8", "shape": [1, 3, 8, 8], "data": [0] * 192}, None,
                     "input 'input': UINT8 shape must be [N, 1, 8, 8], got [1, 3, 8, 8]", id="wrong-shape"),
    ],
)
def test_v2_infer_bad_tensor_for_uint8_model_gets_400(pixels_client, tensor, binary, error):
    r = v2_infer(pixels_client, tensor, binary)
    assert r.status_code == 400, r.text
    assert r.json() == {"error": error}


def test_v2_infer_uint8_tensor_to_float32_model_gets_400(files):
    with TestClient(create_app(Settings(model_path=files[0]))) as client:
        wait_ready(client)
        r = client.post("/v2/models/default/infer", json={"inputs": [
            {"name": "input", "datatype": "UINT8", "shape": [1, 1, 8, 8], "data": [0] * 64}]})
    assert r.status_code == 400, r.text
    assert r.json() == {"error": "input 'input': datatype 'UINT8' is not accepted: send FP32 (preprocessed, "
                                 "[N, C, H, W]) or BYTES (encoded images, [N])"}


@pytest.mark.parametrize(
    ("input_type", "dtype"),
    [pytest.param("tensor(float)", "float32", id="float32"), pytest.param("tensor(uint8)", "uint8", id="uint8")],
)
def test_read_spec_accepts_float32_and_uint8_inputs(input_type, dtype):
    meta = {"labels": ["a", "b"], "input_size": [8, 8], "colour_mode": "L", "mean": [0.5], "std": [0.25],
            "resize": "bilinear"}
    spec = read_spec(meta, [Tensor("input", input_type, ["N", 1, 8, 8])], [Tensor("logits", "tensor(float)", ["N", 2])],
                     name="m", version="0" * 12)
    assert spec.input_dtype == dtype


def test_read_spec_refuses_other_input_types():
    meta = {"labels": ["a", "b"], "input_size": [8, 8], "colour_mode": "L", "mean": [0.5], "std": [0.25],
            "resize": "bilinear"}
    with pytest.raises(ContractError, match=r"must be a float32 or uint8 N x C x H x W tensor, is tensor\(int64\)"):
        read_spec(meta, [Tensor("input", "tensor(int64)", ["N", 1, 8, 8])],
                  [Tensor("logits", "tensor(float)", ["N", 2])], name="m", version="0" * 12)


# --- the gRPC door, as a real process (one protobuf pool cannot hold tritonclient's messages and ours) ------------


@pytest.fixture(scope="module")
def grpc_stub(files, tmp_path_factory) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    port = free_port()
    env = {"RESNET_MODEL_PATH": str(files[1]), "RESNET_GRPC_PORT": str(port)}
    with serve_service(env, tmp_path_factory.mktemp("grpc") / "server.log"), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def grpc_infer(stub, tensor: service_pb2.ModelInferRequest.InferInputTensor) -> np.ndarray:
    request = service_pb2.ModelInferRequest(model_name="default", inputs=[tensor], outputs=[
        service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")])
    response = stub.ModelInfer(request, timeout=30)
    return np.frombuffer(response.raw_output_contents[0], "<f4")


def test_grpc_uint8_contents_answer_as_the_encoded_image(grpc_stub, pixel_spec):
    meta = grpc_stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="default"), timeout=30)
    assert [(t.datatype, list(t.shape)) for t in meta.inputs] == [("UINT8", [-1, 1, 8, 8])], meta
    pixels = pixels_of(pixel_spec, PNGS[6]).ravel()
    typed = service_pb2.ModelInferRequest.InferInputTensor(
        name="input", datatype="UINT8", shape=[1, 1, 8, 8],
        contents=service_pb2.InferTensorContents(uint_contents=pixels.tolist()))
    encoded = service_pb2.ModelInferRequest.InferInputTensor(
        name="input", datatype="BYTES", shape=[1], contents=service_pb2.InferTensorContents(bytes_contents=[PNGS[6]]))
    np.testing.assert_allclose(grpc_infer(grpc_stub, typed), grpc_infer(grpc_stub, encoded), atol=1e-6)


def test_grpc_uint8_contents_above_255_are_invalid(grpc_stub):
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name="input", datatype="UINT8", shape=[1, 1, 8, 8], contents=service_pb2.InferTensorContents(
            uint_contents=[300] * 64))
    with pytest.raises(grpc.RpcError) as e:
        grpc_infer(grpc_stub, tensor)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert e.value.details() == "input 'input': UINT8 data must be integers 0..255", e.value.details()
