"""``create_app(settings)`` assembles the service: the lifespan (``service.lifecycle``), the doors
(``service.routes`` for REST, ``service.v2`` for the Open Inference Protocol), the page (``service.ui``) and the
API docs (``service.api_docs``)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.middleware.gzip import GZipMiddleware

from service import api_docs, http, lifecycle, routes, ui, v2
from service.access_log import AccessLog
from service.predict import PredictEndpoint
from service.runtime import Model
from service.settings import Settings


def create_app(settings: Settings, *, load_model: Callable[[Settings], Model] = Model.load) -> FastAPI:
    """Build the service. ``load_model`` is the seam tests use to observe loading or inject faults."""
    app = FastAPI(
        title="ResNet inference service",
        version="0.1.0",
        summary="Classify images with a residual network exported to ONNX, served by onnxruntime.",
        lifespan=lifecycle.lifespan(settings, load_model),
        docs_url=None,  # served by service.api_docs, from the service itself
        redoc_url=None,
    )
    http.install(app)
    # Responses gzipped for clients that ask (tritonclient's response_compression_algorithm), when larger than a
    # packet or two: a /predict answer or a single image's V2 answer gains nothing from it.
    app.add_middleware(GZipMiddleware, minimum_size=1400, compresslevel=5)
    app.add_middleware(PredictEndpoint)  # added late: outside the other middleware, before it runs
    if settings.access_log:
        app.add_middleware(AccessLog)  # outside even /predict's endpoint, so its requests are logged too
    app.include_router(routes.router)
    app.include_router(v2.router)
    ui.install(app, settings)
    api_docs.install(app)
    return app
