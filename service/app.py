"""``create_app(settings)`` assembles the service: the lifespan (``service.lifecycle``), the doors
(``service.routes`` for REST, ``service.v2`` for the Open Inference Protocol), the page (``service.ui``) and the
API docs (``service.api_docs``)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from service import api_docs, http, lifecycle, routes, ui, v2
from service.access_log import AccessLog
from service.activity import Activity
from service.predict import PATH, PredictEndpoint
from service.runtime import Model
from service.settings import Settings


class Service(FastAPI):
    """FastAPI, with ``POST /predict`` answered before Starlette's middleware stack: each of its layers costs the
    hot path a few microseconds a request, and the endpoint needs none of them (it maps its own errors, counts its
    own metrics and is not gzipped; the access log wraps it alone)."""

    predict: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST":
            scope["app"] = self  # as Starlette sets it: the endpoint finds the service state there
            await self.predict(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, load_model: Callable[[Settings], Model] = Model.load,
               supervised: bool = False, activity: Activity | None = None) -> Service:
    """Build the service. ``load_model`` is the seam tests use to observe loading or inject faults; ``supervised``:
    run as one of ``service.supervisor``'s workers; ``activity``: their shared record of who holds images."""
    app = Service(
        title="ResNet inference service",
        version="0.1.0",
        summary="Classify images with a residual network exported to ONNX, served by onnxruntime.",
        lifespan=lifecycle.lifespan(settings, load_model, supervised, activity),
        docs_url=None,  # served by service.api_docs, from the service itself
        redoc_url=None,
    )
    http.install(app)
    # Responses gzipped for clients that ask (tritonclient's response_compression_algorithm), when larger than a
    # packet or two: a /predict answer or a single image's V2 answer gains nothing from it.
    app.add_middleware(GZipMiddleware, minimum_size=1400, compresslevel=5)
    app.predict = PredictEndpoint()
    if settings.access_log:
        app.add_middleware(AccessLog)
        app.predict = AccessLog(app.predict)  # /predict's requests are logged like every other route's
    app.include_router(routes.router)
    app.include_router(v2.router)
    ui.install(app, settings)
    api_docs.install(app)
    return app
