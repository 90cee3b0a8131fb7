"""The HTTP edge: ``create_app(settings)`` builds the FastAPI app. Routes stay thin: they read the
request, call the core (``service.core``) and shape the answer."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service import errors, metrics, ui, v2
from service.auth import Admin, Authorized
from service.batching import MicroBatcher
from service.body import read_body
from service.core import Classified, ServiceState, State, classify_images
from service.errors import (
    EmptyBody,
    InvalidMultipart,
    NoImages,
    TooManyImages,
    UnsupportedMediaType,
)
from service.runtime import Model, softmax
from service.schemas import Error, Health, ModelCard, ModelRef, PredictResponse, Reloaded
from service.settings import Settings

log = logging.getLogger("service")

RAW_TYPES = ("application/octet-stream", "application/x-www-form-urlencoded")  # the latter: curl --data-binary




def _reload_on_sighup(state: ServiceState) -> Callable[[], None]:
    """SIGHUP reloads the model from ``model_path`` (the usual daemon convention); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    async def reload() -> None:
        try:
            await state.reload()
        except errors.ReloadFailed:
            pass  # logged and counted by reload(); the old model keeps serving

    def on_hup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


def _chain_drain_on_signals(state: ServiceState) -> None:
    """Turn not-ready the moment SIGTERM/SIGINT arrives, then let uvicorn's own handler start its
    graceful shutdown (stop accepting, finish accepted requests, run the lifespan's exit)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread (not so under a TestClient)
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: object, previous: Callable = previous) -> None:
            state.begin_drain()
            previous(signum, frame)

        signal.signal(sig, handler)


# --- reading requests and shaping answers ---------------------------------------------------------------------------


async def read_images(request: Request, settings: Settings) -> list[bytes]:
    """The image payloads of a request: a raw body, or the file parts of a multipart form, in order."""
    content_type = request.headers.get("content-type", "application/octet-stream")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "multipart/form-data" and not (media.startswith("image/") or media in RAW_TYPES):
        raise UnsupportedMediaType()
    body = await read_body(request, settings)
    if not body:
        raise EmptyBody()
    if media != "multipart/form-data":
        return [body]

    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(
        request.headers, stream(), max_files=settings.max_batch_images, max_fields=100,
        max_part_size=settings.max_upload_bytes,
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        # Starlette signals the file-count limit only through this message.
        raise (TooManyImages() if "Too many files" in e.message else InvalidMultipart()) from e
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise NoImages()
        images = [await f.read() for f in files]
    finally:
        await form.close()
    if any(not data for data in images):
        raise EmptyBody("empty file part")
    return images


def build_response(classified: Classified, top_k: int, started: float) -> JSONResponse:
    model = classified.model
    spec = model.spec
    probs = softmax(classified.logits)  # (N, classes), float64
    k = min(top_k, len(spec.labels))
    orders = np.argsort(-probs, axis=1, kind="stable")[:, :k].tolist()  # one numpy call for the whole batch
    labels = spec.labels
    predictions = [
        {"probabilities": p, "top_k": [{"label": labels[i], "index": i, "probability": p[i]} for i in order]}
        for p, order in zip(probs.tolist(), orders, strict=True)
    ]
    body = {"model": {"name": spec.name, "version": spec.version}, "provider": model.provider,
            "predictions": predictions}
    headers = {
        "Server-Timing": classified.server_timing(started),
        "X-Model-Name": spec.name,
        "X-Model-Version": spec.version,
        "X-Inference-Provider": model.provider,
    }
    return JSONResponse(body, headers=headers)


# --- the app ------------------------------------------------------------------------------------

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
                    },
                    "required": ["files"],  # no file part is a 400 (NoImages)
                }
            },
        },
    }
}
ERRORS = {code: {"model": Error} for code in (400, 401, 408, 413, 415, 422, 429, 503, 504)}


def create_app(settings: Settings, *, load_model: Callable[[Settings], Model] = Model.load) -> FastAPI:
    """Build the service. ``load_model`` is the seam tests use to observe loading or inject faults."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(settings, load_model)
        app.state.service = state
        _chain_drain_on_signals(state)
        undo_sighup = _reload_on_sighup(state)
        batcher: MicroBatcher = MicroBatcher(
            lambda model, x: model.run(x), state.infer_pool, settings.max_batch_size,
            settings.max_batch_delay_ms / 1000, settings.max_queue, metrics.observe_batch, metrics.QUEUE_DEPTH.set,
        )
        batcher.start()
        state.batcher = batcher
        # Load in the background: the process answers liveness (and a 503 readiness) while it loads.
        loader = asyncio.create_task(state.load(), name="model-load")
        try:
            if settings.workers > 1:
                # Several workers share one listening socket and the kernel hands each connection to any of
                # them: a worker still loading would answer 503 to traffic sent on another worker's readiness.
                # uvicorn accepts only after the lifespan's startup, so each worker waits for its model.
                await asyncio.shield(loader)
            yield
        finally:
            undo_sighup()
            state.begin_drain()
            loader.cancel()
            await batcher.stop()
            state.decode_pool.shutdown(wait=False, cancel_futures=True)
            state.infer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="ResNet inference service",
        version="0.1.0",
        summary="Classify images with a residual network exported to ONNX, served by onnxruntime.",
        lifespan=lifespan,
    )
    app.add_middleware(metrics.RequestMetrics)
    errors.install(app)
    app.include_router(v2.router)
    ui.install(app, settings)

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=IMAGE_BODY)
    async def predict(
        request: Request,
        state: State,
        _: Authorized,
        top_k: Annotated[int, Query(ge=1, le=1000, description="classes to list, capped at the class count")] = 5,
    ) -> Response:
        """Classify one image (raw body) or several (multipart file parts); probabilities per image."""
        started = time.perf_counter()
        state.require_ready()
        images = await read_images(request, state.settings)
        if len(images) > state.settings.max_batch_images:
            raise TooManyImages()
        classified = await classify_images(state, request, images)
        return build_response(classified, top_k, started)

    @app.get("/health/live", response_model=Health)
    async def live() -> Health:
        """Liveness: 200 while the process can answer."""
        return Health(status="alive")

    @app.get("/health/ready", response_model=Health, responses={503: {"model": Health}})
    async def ready(state: State) -> Response:
        """Readiness: 200 once the model is loaded and warmed up; 503 with the reason otherwise."""
        if state.ready:
            return JSONResponse({"status": "ready", "detail": None})
        return JSONResponse({"status": state.status, "detail": state.reason}, status_code=503)

    @app.get("/model", response_model=ModelCard, responses={503: {"model": Error}})
    async def model_card(state: State, _: Authorized) -> ModelCard:
        """The served model: labels, input shape, preprocessing, provider, and its metadata."""
        serving = state.require_ready()
        spec, meta = serving.model.spec, serving.model.spec.metadata
        return ModelCard(
            name=spec.name, version=spec.version, labels=spec.labels, input_name=spec.input_name,
            input_shape=spec.input_shape,
            preprocessing=spec.preprocessing.to_metadata(),
            provider=serving.model.provider, arch=meta.get("arch"), val_accuracy=meta.get("val_accuracy"),
            created_at=meta.get("created_at"), metadata=meta,
        )

    @app.post("/admin/reload", response_model=Reloaded, responses={401: {"model": Error}, 403: {"model": Error},
                                                                    409: {"model": Error}})
    async def reload(state: State, _: Admin) -> Reloaded:
        """Reload the model from the configured path; the old one serves until the new one is warm."""
        serving = await state.reload()
        spec = serving.model.spec
        return Reloaded(status="reloaded", model=ModelRef(name=spec.name, version=spec.version),
                        provider=serving.model.provider)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(state: State) -> Response:
        """Prometheus exposition."""
        if state.batcher is not None:
            metrics.QUEUE_DEPTH.set(state.batcher.depth)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
