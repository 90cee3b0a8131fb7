"""The service end to end, through HTTP, on the committed default model and real onnxruntime sessions."""

from __future__ import annotations

import gzip
import io
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bench.harness import wait_ready
from service.app import create_app
from service.preprocessing import Preprocessor
from service.runtime import Model
from service.settings import Settings
from tests.conftest import ROOT, loading_after, loading_as
from tests.images import FORMATS, bomb_png, encode, one_per_class, validation_digits


def serve(settings: Settings, **kwargs) -> Iterator[TestClient]:
    with TestClient(create_app(settings, **kwargs), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def settings(default_model) -> Settings:
    return Settings(model_path=default_model, max_batch_size=8, max_upload_bytes=200_000, max_image_pixels=10_000_000,
                    max_batch_images=16)


@pytest.fixture(scope="module")
def client(settings) -> Iterator[TestClient]:
    for c in serve(settings):
        wait_ready(c)
        yield c


def png(img: Image.Image) -> bytes:
    return encode(img, "PNG")


# --- happy paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_predict_classifies_digit_in_every_format(client, fmt):
    for img, label in one_per_class():
        data = FORMATS[fmt](img)
        r = client.post("/predict", content=data, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        top = r.json()["predictions"][0]["top_k"][0]
        assert top["label"] == str(label), (fmt, label, r.text)


def test_predict_raw_body_as_curl_sends_it(client):
    img, label = one_per_class()[3]
    # curl --data-binary @x.png sends this content type unless told otherwise
    r = client.post("/predict", content=png(img), headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["top_k"][0]["label"] == str(label)


def test_predict_response_has_probabilities_topk_and_model(client, default_model):
    img, label = one_per_class()[5]
    r = client.post("/predict?top_k=3", content=png(img), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == "default" and len(body["model"]["version"]) == 12
    assert body["provider"] == "CPUExecutionProvider"
    assert r.headers["x-inference-provider"] == "CPUExecutionProvider"
    assert r.headers["x-model-version"] == body["model"]["version"]
    assert {p.split(";")[0] for p in r.headers["server-timing"].split(", ")} == {
        "decode", "preprocess", "queue", "infer", "total"}
    (pred,) = body["predictions"]
    probs = np.array(pred["probabilities"])
    assert probs.shape == (10,) and abs(probs.sum() - 1) < 1e-5
    assert [t["index"] for t in pred["top_k"]] == list(np.argsort(-probs)[:3])
    assert [t["probability"] for t in pred["top_k"]] == sorted((t["probability"] for t in pred["top_k"]), reverse=True)
    assert pred["top_k"][0] == {"label": str(label), "index": label, "probability": probs[label]}


def test_predict_probabilities_equal_softmax_of_direct_session(client, default_model, settings):
    img, _ = one_per_class()[8]
    r = client.post("/predict", content=png(img), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    model = Model.load(settings)
    from service.preprocessing import Preprocessor

    x = Preprocessor(model.spec, 10**7)(png(img)).x[None]
    session = ort.InferenceSession(default_model, providers=["CPUExecutionProvider"])
    want = session.run(["probabilities"], {"input": x})[0][0]
    np.testing.assert_allclose(r.json()["predictions"][0]["probabilities"], want, atol=1e-6)


@pytest.mark.parametrize(("progressive", "on_pool"), [(False, False), (True, True)],
                         ids=["baseline-on-the-idle-loop", "progressive-on-the-pool"])
def test_predict_lone_photo_equals_softmax_of_direct_session_wherever_decoded(client, default_model, settings,
                                                                             monkeypatch, progressive, on_pool):
    threads = []
    finish = Preprocessor.finish

    def recorded(self, header):
        threads.append(threading.current_thread().name)
        return finish(self, header)

    monkeypatch.setattr(Preprocessor, "finish", recorded)
    img, label = one_per_class()[3]
    rng = np.random.default_rng(3)  # sensor noise within the ink threshold, so the file is photo-sized
    arr = np.asarray(img.resize((480, 480), Image.Resampling.BILINEAR).convert("RGB"), np.int16)
    arr = np.pad(arr, ((0, 0), (80, 80), (0, 0))) + rng.integers(0, 12, (480, 640, 3))
    data = encode(Image.fromarray(arr.clip(0, 255).astype(np.uint8)), "JPEG", quality=90, progressive=progressive)
    assert len(data) > 4096, len(data)  # past the small images' rule
    r = client.post("/predict", content=data, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["top_k"][0]["label"] == str(label), r.text
    assert [name.startswith("decode") for name in threads] == [on_pool], threads
    monkeypatch.undo()
    x = Preprocessor(Model.load(settings).spec, 10**7)(data).x[None]
    session = ort.InferenceSession(default_model, providers=["CPUExecutionProvider"])
    want = session.run(["probabilities"], {"input": x})[0][0]
    np.testing.assert_allclose(r.json()["predictions"][0]["probabilities"], want, atol=1e-6)


def test_predict_multipart_batch_answers_in_order(client):
    pairs = one_per_class()
    files = [("files", (f"{y}.png", png(img), "image/png")) for img, y in reversed(pairs)]
    r = client.post("/predict?top_k=1", files=files)
    assert r.status_code == 200, r.text
    labels = [p["top_k"][0]["label"] for p in r.json()["predictions"]]
    assert labels == [str(y) for _, y in reversed(pairs)]


def test_predict_top_k_capped_at_class_count(client):
    img, _ = one_per_class()[0]
    r = client.post("/predict?top_k=50", content=png(img), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"][0]["top_k"]) == 10


def test_predict_accuracy_on_validation_pngs(client):
    images, labels = validation_digits()
    files = [("files", (f"{i}.png", png(img), "image/png")) for i, img in enumerate(images[:16])]
    r = client.post("/predict?top_k=1", files=files)
    assert r.status_code == 200, r.text
    got = [int(p["top_k"][0]["label"]) for p in r.json()["predictions"]]
    assert sum(g == y for g, y in zip(got, labels[:16], strict=True)) >= 15, got


def test_predict_large_jpeg_decodes_at_reduced_scale(client, version_1_model):
    img, label = one_per_class()[2]
    big = img.resize((1600, 1600), Image.Resampling.BILINEAR).convert("RGB")
    data = encode(big, "JPEG", quality=75)
    r = client.post("/predict", content=data, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["top_k"][0]["label"] == str(label)
    from service.preprocessing import Preprocessor

    # A stretching model (the default fits to content, which decodes in full: the ink may be a few pixels).
    pre = Preprocessor(Model.load(Settings(model_path=version_1_model)).spec, 10**8)
    decoded = pre.decode(pre.open(data).image)
    assert decoded.size == (200, 200)  # 1/8 scale via JPEG draft mode, still >= 32x32


# --- bad input: a clear 4xx, never a 500 --------------------------------------------------------


def truncated_png() -> bytes:
    data = png(one_per_class()[0][0].resize((64, 64)))
    return data[: len(data) // 2]


def form_part(disposition: str, data: bytes = b"\x89PNG") -> bytes:
    """One part of a multipart body with boundary ``x``."""
    return f"--x\r\nContent-Disposition: form-data; {disposition}\r\n\r\n".encode() + data + b"\r\n"


def multipart(n: int) -> dict:
    return {"files": [("files", (f"{i}.png", png(one_per_class()[0][0]), "image/png")) for i in range(n)]}


def multipart_with(index: int, part: bytes, n: int = 3) -> dict:
    """``n`` good digits with ``part`` in place of the one at ``index`` (0-based)."""
    files = multipart(n)["files"]
    files[index] = ("files", ("bad.png", part, "image/png"))
    return {"files": files}


TOO_MANY_PIXELS = "image has too many pixels: limit 10000000 (width x height, RESNET_MAX_IMAGE_PIXELS)"


@pytest.mark.parametrize(
    ("request_kwargs", "status", "detail"),
    [
        pytest.param({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty body", id="empty-body"),
        pytest.param({"content": b"not an image at all", "headers": {"content-type": "image/png"}}, 400,
                     "could not decode image", id="garbage-bytes"),
        pytest.param({"content": truncated_png(), "headers": {"content-type": "image/png"}}, 400,
                     "could not decode image", id="truncated-png"),
        pytest.param({"content": b"%!PS-Adobe-3.0 EPSF-3.0\n", "headers": {"content-type": "image/x-eps"}}, 400,
                     "could not decode image", id="eps-not-allowed"),
        pytest.param({"json": {"image": "abc"}}, 415,
                     "unsupported content type: send image/*, application/octet-stream or multipart/form-data",
                     id="json"),
        pytest.param({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415,
                     "unsupported content type: send image/*, application/octet-stream or multipart/form-data",
                     id="text"),
        pytest.param({"content": b"\0" * 200_001, "headers": {"content-type": "image/png"}}, 413,
                     "body too large: limit 200000 bytes (RESNET_MAX_UPLOAD_BYTES)", id="body-over-limit"),
        pytest.param({"content": bomb_png(), "headers": {"content-type": "image/png"}}, 413, TOO_MANY_PIXELS,
                     id="decompression-bomb"),
        pytest.param({"content": bomb_png(4000, 3000), "headers": {"content-type": "image/png"}}, 413,
                     TOO_MANY_PIXELS, id="over-pixel-setting"),
        pytest.param(multipart(17), 413, "too many images in one request: limit 16 (RESNET_MAX_BATCH_IMAGES)",
                     id="too-many-files"),
        # One bad part of several: the message says which, counting from 1.
        pytest.param(multipart_with(1, b"not an image at all"), 400, "image 2 of 3: could not decode image",
                     id="bad-second-part-of-three"),
        pytest.param(multipart_with(2, b"\x89PNG\r\n\x1a\n" + bytes(8000)), 400,
                     "image 3 of 3: could not decode image", id="bad-large-third-part-decoded-in-pool"),
        pytest.param(multipart_with(0, bomb_png(4000, 3000)), 413, f"image 1 of 3: {TOO_MANY_PIXELS}",
                     id="oversized-first-part-of-three"),
        pytest.param(multipart_with(1, b""), 400, "image 2 of 3: empty file part", id="empty-second-part-of-three"),
        pytest.param({"content": png(one_per_class()[0][0]),
                      "headers": {"content-type": "image/png", "content-encoding": "br"}}, 415,
                     "unsupported Content-Encoding: send gzip, deflate or identity", id="brotli-body"),
        pytest.param({"content": gzip.compress(png(one_per_class()[0][0]))[:-8],
                      "headers": {"content-type": "image/png", "content-encoding": "gzip"}}, 400,
                     "the body does not inflate: malformed or truncated gzip/deflate data", id="gzip-truncated"),
        pytest.param({"content": gzip.compress(b"\0" * 200_001),
                      "headers": {"content-type": "image/png", "content-encoding": "gzip"}}, 413,
                     "body too large: limit 200000 bytes (RESNET_MAX_UPLOAD_BYTES)", id="gzip-inflates-over-limit"),
        # curl --data-binary sends urlencoded; such a body is taken as image bytes, so form fields fail to decode
        pytest.param({"data": {"note": "no file"}}, 400, "could not decode image", id="urlencoded-form-fields"),
        pytest.param({"content": b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv\r\n--x--\r\n",
                      "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400,
                     "multipart body has no file parts", id="multipart-without-files"),
        pytest.param({"content": form_part('name="f"; filename="a.png"') + b"--x--\r\n",
                      "headers": {"content-type": "multipart/form-data"}}, 400, "malformed multipart body",
                     id="multipart-without-boundary"),
        pytest.param({"content": form_part('filename="a.png"') + b"--x--\r\n",
                      "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "malformed multipart body",
                     id="multipart-part-without-name"),
        pytest.param({"content": form_part('name="a"', b"v") * 101 + b"--x--\r\n",
                      "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "malformed multipart body",
                     id="multipart-over-100-fields"),
        pytest.param({"content": b"--x\r\nnot a header line\r\n\r\n",
                      "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "malformed multipart body",
                     id="multipart-garbled-headers"),
    ],
)
def test_predict_bad_input_gets_clear_4xx(client, request_kwargs, status, detail):
    r = client.post("/predict", **request_kwargs)
    assert r.status_code == status, r.text
    assert r.json() == {"detail": detail}
    ok = client.post("/predict", content=png(one_per_class()[1][0]), headers={"content-type": "image/png"})
    assert ok.status_code == 200, ok.text  # and the service keeps serving


@pytest.mark.parametrize(
    ("body", "want"),
    [
        pytest.param(form_part('name="a"; filename="1.png"', b"one") + form_part('name="note"', b"text")
                     + form_part('name="b"; filename=""', b"two") + b"--x--\r\n", [b"one", b"two"],
                     id="files-in-order-fields-dropped"),
        pytest.param(form_part('name="a"', b"v" * (2**20 + 1)) + b"--x--\r\n", "InvalidMultipart",
                     id="field-over-1-mib"),
        pytest.param(form_part('name="a"; filename="1.png"') * 3 + b"--x--\r\n", "TooManyImages",
                     id="files-over-limit"),
        pytest.param(form_part('name="a"; filename="1.png"'), [], id="no-closing-boundary"),
    ],
)
def test_file_parts_parse_forms(body, want):
    from service.errors import ServiceError
    from service.predict import FileParts

    try:
        got = FileParts.parse(body, "multipart/form-data; boundary=x", max_files=2)
    except ServiceError as e:
        got = type(e).__name__
    assert got == want


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        pytest.param("top_k=0", "invalid top_k: Input should be greater than or equal to 1", id="zero"),
        pytest.param("top_k=abc", "invalid top_k: Input should be a valid integer, unable to parse string as an "
                                  "integer", id="not-int"),
        pytest.param("top_k=", "invalid top_k: Input should be a valid integer, unable to parse string as an "
                               "integer", id="blank"),
    ],
)
def test_predict_bad_top_k_gets_422(client, query, detail):
    r = client.post(f"/predict?{query}", content=png(one_per_class()[1][0]), headers={"content-type": "image/png"})
    assert r.status_code == 422, r.text
    assert r.json() == {"detail": detail}


# --- server states ------------------------------------------------------------------------------


class TestBeforeReady:
    def test_predict_and_ready_503_live_200_while_loading(self, settings):
        gate = threading.Event()

        slow_load = loading_after(gate)

        for c in serve(settings, load_model=slow_load):
            r = c.get("/health/ready")
            assert r.status_code == 503, r.text
            assert r.json() == {"status": "loading", "detail": "model is loading"}
            assert c.get("/health/live").status_code == 200
            r = c.post("/predict", content=png(one_per_class()[0][0]), headers={"content-type": "image/png"})
            assert r.status_code == 503, r.text
            assert r.json() == {"detail": "model not ready"}
            assert c.get("/model").status_code == 503
            gate.set()
            wait_ready(c)
            r = c.post("/predict", content=png(one_per_class()[0][0]), headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text


def corrupt_model(tmp_path) -> str:
    p = tmp_path / "corrupt.onnx"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    return str(p)


def model_without_labels(tmp_path, default_model) -> str:
    import onnx

    proto = onnx.load(default_model)
    kept = [p for p in proto.metadata_props if p.key != "labels"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    p = tmp_path / "nolabels.onnx"
    onnx.save(proto, p)
    return str(p)


def model_with_flat_input(tmp_path, default_model) -> str:
    """A real ONNX graph with the default model's metadata but a rank-2 input: incompatible."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])], "flat",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = onnx.load(default_model).ir_version
    proto.metadata_props.extend(onnx.load(default_model).metadata_props)
    p = tmp_path / "flat.onnx"
    onnx.save(proto, p)
    return str(p)


@pytest.mark.parametrize(
    ("make_settings", "reason"),
    [
        pytest.param(lambda tmp, m: {"model_path": tmp / "missing.onnx"}, "model file not found", id="missing-file"),
        pytest.param(lambda tmp, m: {"model_path": model_with_flat_input(tmp, m)},
                     "model input must be a float32 or uint8 N x C x H x W tensor", id="wrong-input-rank"),
        pytest.param(lambda tmp, m: {"model_path": corrupt_model(tmp)}, "onnxruntime cannot load", id="corrupt"),
        pytest.param(lambda tmp, m: {"model_path": model_without_labels(tmp, m)},
                     "model metadata lacks required key 'labels'", id="no-labels-metadata"),
        pytest.param(lambda tmp, m: {"model_path": m, "device": "cuda"},
                     "DEVICE=cuda but the CUDA execution provider is not active", id="cuda-without-gpu"),
    ],
)
def test_failed_load_never_ready_and_says_why(tmp_path, default_model, make_settings, reason):
    if "cuda" in reason and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host has a CUDA-enabled onnxruntime; the refusal path needs one without")
    s = Settings(**make_settings(tmp_path, default_model))
    for c in serve(s):
        deadline = time.monotonic() + 30
        while c.get("/health/ready").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        r = c.get("/health/ready")
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "failed" and reason in r.json()["detail"], r.text
        why = r.json()["detail"]
        assert c.get("/health/live").status_code == 200
        r = c.post("/predict", content=png(one_per_class()[0][0]), headers={"content-type": "image/png"})
        assert r.status_code == 503, r.text
        assert r.json() == {"detail": f"model failed to load: {why}"}  # what readiness knows, not "not ready"


def test_unexpected_failure_gives_500_with_logged_error_id_then_serves(settings, caplog):
    class FailsOnce(Model):
        failures = 0

        def run(self, x, alone=False):
            if x.shape[0] == 1 and FailsOnce.failures == 0 and getattr(self, "warm", False):
                FailsOnce.failures += 1
                raise RuntimeError("injected onnxruntime failure")
            return super().run(x, alone)

    load = loading_as(FailsOnce)

    for c in serve(settings, load_model=load):
        wait_ready(c)
        c.app.state.service.serving.model.warm = True
        with caplog.at_level(logging.ERROR, logger="service"):
            r = c.post("/predict", content=png(one_per_class()[0][0]), headers={"content-type": "image/png"})
        assert r.status_code == 500, r.text
        error_id = r.json()["error_id"]
        assert r.json() == {"detail": "inference failed", "error_id": error_id}
        assert any(error_id in rec.getMessage() for rec in caplog.records)
        r = c.post("/predict", content=png(one_per_class()[0][0]), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text


# --- metadata, health, metrics, OpenAPI ---------------------------------------------------------


def test_model_card_describes_model(client):
    r = client.get("/model")
    assert r.status_code == 200, r.text
    card = r.json()
    assert card["labels"] == [str(i) for i in range(10)]
    assert card["input_shape"] == [-1, 1, 32, 32] and card["input_name"] == "input"
    assert card["preprocessing"]["colour_mode"] == "L" and card["provider"] == "CPUExecutionProvider"
    assert card["preprocessing"] | {"mean": None, "std": None} == {  # the default reads drawings: fit to content
        "input_size": [32, 32], "colour_mode": "L", "mean": None, "std": None, "resize": "bilinear",
        "resize_mode": "stretch", "crop_fraction": None, "background": [0],
        "fit_to_content": {"margin": 0.1, "threshold": 32}, "jpeg_luma": True}
    assert card["arch"] == "resnet20" and card["val_accuracy"] >= 0.99


def test_health_endpoints_answer_when_ready(client):
    assert client.get("/health/live").json() == {"status": "alive", "detail": None}
    assert client.get("/health/ready").json() == {"status": "ready", "detail": None}


def test_metrics_exposes_stages_and_model_info(client):
    client.post("/predict", content=png(one_per_class()[0][0]), headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    for name in ("predict_decode_seconds_bucket", "predict_preprocess_seconds_bucket", "predict_queue_wait_seconds",
                 "predict_inference_seconds", "predict_batch_size_bucket", "predict_queue_depth",
                 'http_requests_total{method="POST",route="/predict",status="200"}'):
        assert "resnet_serve_" + name in text, name
    assert 'resnet_serve_model_info{name="default",provider="CPUExecutionProvider"' in text


def test_openapi_documents_predict(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/predict"]["post"]
    assert {"image/*", "application/octet-stream", "multipart/form-data"} <= set(op["requestBody"]["content"])
    assert "PredictResponse" in json.dumps(op["responses"]["200"])


def test_service_never_imports_torch(default_model):
    code = f"""
import sys
from fastapi.testclient import TestClient
from PIL import Image
import io, time
from service.app import create_app
from service.settings import Settings
buf = io.BytesIO(); Image.new('L', (32, 32)).save(buf, 'PNG')
with TestClient(create_app(Settings(model_path={str(default_model)!r}))) as c:
    while c.get('/health/ready').status_code != 200: time.sleep(0.05)
    assert c.post('/predict', content=buf.getvalue(), headers={{'content-type': 'image/png'}}).status_code == 200
print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize(
    ("settings", "names", "tf32"),
    [
        pytest.param({"device": "cpu"}, ["CPUExecutionProvider"], None, id="cpu"),
        pytest.param({"device": "cuda"}, ["CUDAExecutionProvider", "CPUExecutionProvider"], "0", id="cuda-exact"),
        pytest.param({"device": "cuda", "cuda_tf32": True}, ["CUDAExecutionProvider", "CPUExecutionProvider"], "1",
                     id="cuda-tf32"),
    ],
)
def test_providers_follow_device_and_tf32_settings(settings, names, tf32):
    from service.runtime import providers

    chosen = providers(Settings(**settings))
    assert [p if isinstance(p, str) else p[0] for p in chosen] == names, chosen
    if tf32 is not None:
        assert chosen[0][1]["use_tf32"] == tf32, chosen


@pytest.mark.parametrize(
    ("value", "spinning"),
    [
        pytest.param("in_run", "in_run", id="in-run"),
        pytest.param("off", "off", id="off"),
        pytest.param("on", "on", id="on"),
        pytest.param("alone", "alone", id="alone"),
        # the setting's values from when it was a boolean keep their meaning
        pytest.param("true", "on", id="true"),
        pytest.param("FALSE", "off", id="false"),
        pytest.param("0", "off", id="zero"),
    ],
)
def test_ort_spinning_reads_words_and_booleans(monkeypatch, value, spinning):
    monkeypatch.setenv("RESNET_ORT_SPINNING", value)
    assert Settings().ort_spinning == spinning


def process_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize(
    ("spinning", "entries", "spins_when_idle"),
    [
        pytest.param("off", {"session.intra_op.allow_spinning": "0"}, False, id="off"),
        pytest.param("in_run", {"session.force_spinning_stop": "1"}, False, id="in-run"),
        pytest.param("on", {}, True, id="on"),
        # the session for batches that share the machine; the lone session is the next test's
        pytest.param("alone", {"session.intra_op.allow_spinning": "0"}, False, id="alone"),
    ],
)
def test_load_spins_onnxruntime_threads_as_set(settings, spinning, entries, spins_when_idle):
    model = Model.load(settings.model_copy(update={"ort_spinning": spinning, "intra_op_threads": 2}))
    options = model.session.get_session_options()
    for key, value in entries.items():
        assert options.get_session_config_entry(key) == value, key
    x = np.zeros((1, model.spec.channels, *model.spec.input_size), model.spec.input_dtype)
    time.sleep(0.1)  # any other pool in this process done spinning first
    model.run(x)
    # What the setting is for: a pool left spinning after a run burns a core while the service is idle (onnxruntime
    # spins some 40-60 ms, then sleeps).
    before = process_cpu_s()
    time.sleep(0.2)
    idle_cpu = process_cpu_s() - before
    del model
    if spins_when_idle:
        assert idle_cpu > 0.015, idle_cpu
    else:
        assert idle_cpu < 0.01, idle_cpu


@pytest.mark.parametrize(
    ("spinning", "cores", "zero_cost", "lone"),
    [
        pytest.param("alone", 2, False, True, id="alone"),
        pytest.param("alone", 1, False, False, id="alone-on-one-core"),  # no pool to spin
        pytest.param("alone", 2, True, False, id="alone-with-a-model-of-microseconds"),  # nothing to share out
        pytest.param("off", 2, False, False, id="off"),
        pytest.param("in_run", 2, False, False, id="in-run"),
    ],
)
def test_load_keeps_a_spinning_session_for_lone_batches_only_when_alone(monkeypatch, tmp_path, settings, spinning,
                                                                         cores, zero_cost, lone):
    from bench.zero_cost import zero_cost_model
    from service import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: cores)
    path = zero_cost_model(settings.model_path, tmp_path / "zero.onnx") if zero_cost else settings.model_path
    model = Model.load(settings.model_copy(update={"ort_spinning": spinning, "intra_op_threads": 1,
                                                   "model_path": path}))
    assert (model.lone_session is not None) == lone
    assert model.session.get_session_options().intra_op_num_threads == 1
    pre = Preprocessor(model.spec, settings.max_image_pixels)
    x = np.stack([pre(png(img)).x for img, _ in one_per_class()[:3]])
    assert np.array_equal(model.run(x, alone=True), model.run(x))  # the same model, whichever session runs it
    if lone:
        options = model.lone_session.get_session_options()
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        assert options.intra_op_num_threads == cores  # a lone batch has every core, whatever the share
        time.sleep(0.1)
        model.run(x, alone=True)
        before = process_cpu_s()
        time.sleep(0.2)
        assert process_cpu_s() - before < 0.01  # spinning within the run only: idle once it returned


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"RESNET_DEVICE": "tpu"}, "device", id="bad-device"),
        pytest.param({"RESNET_MAX_QUEUE": "4", "RESNET_MAX_BATCH_IMAGES": "8"}, "max_queue", id="queue-too-small"),
        pytest.param({"RESNET_PORT": "70000"}, "port", id="bad-port"),
    ],
)
def test_settings_refuse_unsafe_values(monkeypatch, env, message):
    from pydantic import ValidationError

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError, match=message):
        Settings()


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        pytest.param({"cpu.max": "max 100000\n"}, None, id="v2-unlimited"),
        pytest.param({"cpu.max": "200000 100000\n"}, 2, id="v2-two-cpus"),
        pytest.param({"cpu.max": "150000 100000\n"}, 2, id="v2-one-and-a-half-rounds-up"),
        pytest.param({"cpu.max": "50000 100000\n"}, 1, id="v2-half-a-cpu-is-one"),
        pytest.param({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3, id="v1-three"),
        pytest.param({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, id="v1-unlimited"),
        pytest.param({}, None, id="no-cgroup"),
    ],
)
def test_cpu_quota_read_from_the_cgroup(tmp_path, files, cores):
    from service.settings import cpu_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == cores


def test_workers_and_threads_default_to_shares_of_the_usable_cores(monkeypatch):
    from service import settings as settings_module

    monkeypatch.setattr(settings_module, "usable_cores", lambda: 4)
    default = Settings()
    threads = (default.effective_workers, default.effective_decode_threads, default.effective_intra_op_threads)
    assert threads == (4, 1, 1)
    one = Settings(workers=1)
    assert (one.effective_workers, one.effective_decode_threads, one.effective_intra_op_threads) == (1, 4, 4)
    assert Settings(workers=3, decode_threads=2, intra_op_threads=2).effective_decode_threads == 2
    assert Settings(workers=3, intra_op_threads=2).effective_intra_op_threads == 2
    assert default.ort_spinning == "alone"


def test_image_fixture_is_a_real_digit():
    img, label = one_per_class()[4]
    assert img.size == (32, 32) and label == 4 and np.asarray(img).max() > 128
    assert Image.open(io.BytesIO(png(img))).size == (32, 32)


def test_io_binding_gives_same_probabilities(settings, client):
    img, _ = one_per_class()[9]
    want = client.post("/predict", content=png(img), headers={"content-type": "image/png"}).json()
    for c in serve(settings.model_copy(update={"io_binding": "on"})):
        wait_ready(c)
        assert c.app.state.service.serving.model.io_binding is True
        r = c.post("/predict", content=png(img), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["predictions"][0]["probabilities"],
                                   want["predictions"][0]["probabilities"], atol=1e-6)
