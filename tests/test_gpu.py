"""The CUDA path, checked on a real GPU: the provider really active, IO binding in use, and answers that
agree with the CPU. Skipped (with the reason) on hosts where onnxruntime cannot run CUDA, such as CI;
run on a GPU host with onnxruntime-gpu installed: ``pytest tests/test_gpu.py``."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.preprocessing import Preprocessor
from service.runtime import CUDA, Model, softmax
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL
from tests.images import encode, validation_digits


def cuda_unusable() -> str | None:
    """Why CUDA cannot be tested here, or None: a CUDA build of onnxruntime is not enough, the session
    must really run on it (no driver or no GPU makes it fall back to the CPU)."""
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime has no CUDA provider ({ort.get_available_providers()})"
    session = ort.InferenceSession(str(DEFAULT_MODEL), providers=[CUDA, "CPUExecutionProvider"])
    if session.get_providers()[0] != CUDA:
        return "onnxruntime has a CUDA provider but no usable GPU"
    return None


pytestmark = pytest.mark.skipif(cuda_unusable() is not None, reason=str(cuda_unusable()))


def validation_batch(n: int = 128) -> tuple[np.ndarray, list[bytes], list[int]]:
    """n validation digits preprocessed exactly as the service does, and as PNGs."""
    images, labels = validation_digits()
    cpu = Model.load(Settings(model_path=DEFAULT_MODEL, device="cpu"))
    pre = Preprocessor(cpu.spec, 10**7)
    pngs = [encode(img, "PNG") for img in images[:n]]
    return np.stack([pre(p).x for p in pngs]), pngs, labels[:n]


def probabilities(model: Model, x: np.ndarray) -> np.ndarray:
    return softmax(model.run(x))


def test_load_runs_on_cuda_with_io_binding():
    model = Model.load(Settings(model_path=DEFAULT_MODEL, device="cuda"))
    assert model.provider == CUDA and model.session.get_providers()[0] == CUDA, model.session.get_providers()
    assert model.io_binding, "io_binding=auto must turn on with the CUDA provider"
    model.warm_up(8)


def test_cuda_probabilities_match_cpu_on_validation_images():
    x, _, labels = validation_batch()
    cpu = probabilities(Model.load(Settings(model_path=DEFAULT_MODEL, device="cpu")), x)
    gpu = probabilities(Model.load(Settings(model_path=DEFAULT_MODEL, device="cuda")), x)
    diff = float(np.abs(cpu - gpu).max())
    print(f"max |p_cuda - p_cpu| over {len(x)} validation images: {diff:.2e}")
    # Other conv algorithms than MLAS, so not bitwise; with TF32 (onnxruntime's default, RESNET_CUDA_TF32) an H200
    # gave 1.1e-3, with full float32 (our default) 5.5e-7.
    assert diff < 1e-5, diff
    assert (gpu.argmax(1) == cpu.argmax(1)).all()
    assert (gpu.argmax(1) == np.asarray(labels)).mean() > 0.97


def test_fp16_model_on_cuda_matches_fp32(tmp_path):
    from model.export import to_fp16

    path = tmp_path / "default-fp16.onnx"
    onnx.save(to_fp16(onnx.load(DEFAULT_MODEL)), path)
    x, _, _ = validation_batch()
    fp32 = probabilities(Model.load(Settings(model_path=DEFAULT_MODEL, device="cpu")), x)
    half = Model.load(Settings(model_path=path, device="cuda"))
    assert half.provider == CUDA
    fp16 = probabilities(half, x)
    diff = float(np.abs(fp32 - fp16).max())
    print(f"max |p_fp16_cuda - p_fp32_cpu| over {len(x)} validation images: {diff:.2e}")
    assert diff < 2e-2, diff
    assert (fp16.argmax(1) == fp32.argmax(1)).mean() >= 0.99


def test_service_on_cuda_answers_as_on_cpu():
    _, pngs, _ = validation_batch(16)
    answers = {}
    for device in ("cpu", "cuda"):
        settings = Settings(model_path=DEFAULT_MODEL, device=device, max_batch_size=8)
        with TestClient(create_app(settings)) as client:
            deadline = time.monotonic() + 60
            while client.get("/health/ready").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            r = client.get("/model")
            assert r.status_code == 200 and r.json()["provider"] == (CUDA if device == "cuda" else
                                                                     "CPUExecutionProvider"), r.text
            files = [("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
            r = client.post("/predict", files=files)
            assert r.status_code == 200, r.text
            answers[device] = np.array([p["probabilities"] for p in r.json()["predictions"]])
            metrics = client.get("/metrics").text
            assert f'provider="{CUDA if device == "cuda" else "CPUExecutionProvider"}"' in metrics, metrics[:2000]
    np.testing.assert_allclose(answers["cuda"], answers["cpu"], atol=1e-5)
