"""The baseline to beat: the FastAPI app one writes by hand in an afternoon.

One uvicorn worker; a plain ``def`` route, so FastAPI runs each request (full-size decode, resize,
one ``session.run``) in its thread pool; no batching across requests, no draft-mode JPEG decoding.
Run: ``NAIVE_MODEL=models/default.onnx uvicorn --factory bench.naive_app:create --port 8001``.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from contract import INPUT_NAME, LOGITS


def create() -> FastAPI:
    # NAIVE_DEVICE=cuda: the same app as one would write it for a GPU (bench/run.py --device cuda).
    gpu = os.environ.get("NAIVE_DEVICE") == "cuda"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    session = ort.InferenceSession(os.environ["NAIVE_MODEL"], providers=providers)
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    h, w = meta["input_size"]
    mean = np.asarray(meta["mean"], np.float32).reshape(-1, 1, 1)
    std = np.asarray(meta["std"], np.float32).reshape(-1, 1, 1)
    pixels_in = session.get_inputs()[0].type == "tensor(uint8)"  # the graph normalises (export --uint8-input)

    def prepare(data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data)).convert(meta["colour_mode"]).resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, np.uint8 if pixels_in else np.float32)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return arr if pixels_in else (arr / 255.0 - mean) / std

    def infer(images: list[bytes]) -> dict:
        x = np.stack([prepare(d) for d in images])
        logits = session.run([LOGITS], {INPUT_NAME: x})[0]
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs = e / e.sum(1, keepdims=True)
        return {"predictions": [{"probabilities": p.tolist()} for p in probs]}

    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            images = [await f.read() for _, f in form.multi_items()]
        else:
            images = [await request.body()]
        return await run_in_threadpool(infer, images)

    @app.get("/health/ready")
    def ready() -> dict:
        return {"status": "ready"}

    return app
