"""Domain errors, raised deep in the service and mapped to HTTP in one place (``install``).

Every error body is ``{"detail": "<short fixed message>"}``, except under ``/v2``, where the Open
Inference Protocol asks for ``{"error": "<message>"}`` and for 400 rather than 422 on a malformed
request. An unexpected failure also carries an ``error_id`` that is written to the log beside the
traceback.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("service")


class ServiceError(Exception):
    status = 500
    detail = "internal error"

    def __init__(self, detail: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or self.detail)
        if detail is not None:
            self.detail = detail
        self.headers = headers or {}


class EmptyBody(ServiceError):
    status, detail = 400, "empty body"


class InvalidImage(ServiceError):
    status, detail = 400, "could not decode image"


class NoImages(ServiceError):
    status, detail = 400, "multipart body has no file parts"


class InvalidMultipart(ServiceError):
    status, detail = 400, "malformed multipart body"


class Unauthorized(ServiceError):
    status, detail = 401, "missing or invalid API key"

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": "Bearer"})


class AdminDisabled(ServiceError):
    status, detail = 403, "admin endpoints are off: set RESNET_API_KEYS to enable them"


class BodyTimeout(ServiceError):
    status, detail = 408, "request body not received in time"


class ReloadFailed(ServiceError):
    status, detail = 409, "reload failed; the previous model is still serving"


class PayloadTooLarge(ServiceError):
    status, detail = 413, "body too large"


class ImageTooLarge(ServiceError):
    status, detail = 413, "image has too many pixels"


class TooManyImages(ServiceError):
    status, detail = 413, "too many images in one request"


class InvalidInferenceRequest(ServiceError):
    status, detail = 400, "invalid inference request"  # raised with a message naming the tensor and the fault


class UnknownModel(ServiceError):
    status, detail = 404, "unknown model"


class UnsupportedMediaType(ServiceError):
    status = 415
    detail = "unsupported content type: send image/*, application/octet-stream or multipart/form-data"


class UnsupportedContentEncoding(ServiceError):
    status, detail = 415, "unsupported Content-Encoding: send the body uncompressed"


class QueueFull(ServiceError):
    status, detail = 429, "server busy: inference queue is full"


class ModelNotReady(ServiceError):
    status, detail = 503, "model not ready"


class DeadlineExceeded(ServiceError):
    status, detail = 504, "request timed out"


class ClientGone(ServiceError):
    status, detail = 499, "client closed request"  # nginx's code; nobody is left to read it


class InferenceFailed(ServiceError):
    status, detail = 500, "inference failed"


class ModelLoadError(RuntimeError):
    """The model file cannot be served; the message names the cause. Not an HTTP error: it keeps the
    service from becoming ready."""


def _is_v2(request: Request) -> bool:
    path = request.url.path
    return path == "/v2" or path.startswith("/v2/")


def _body(request: Request, message: str) -> dict[str, str]:
    return {"error" if _is_v2(request) else "detail": message}


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    body = _body(request, exc.detail)
    if exc.status >= 500 and exc.status not in (503, 504):
        body["error_id"] = error_id = uuid.uuid4().hex[:12]
        log.error("error_id=%s %s %s: %s", error_id, request.method, request.url.path, exc.__cause__ or exc)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    log.exception("error_id=%s unexpected failure on %s %s", error_id, request.method, request.url.path)
    return JSONResponse({**_body(request, "internal error"), "error_id": error_id}, status_code=500)


async def _client_disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
    """Starlette raises this when the client leaves while its body is read: their doing, not a 500."""
    return await _service_error(request, ClientGone())


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body", "header"))
    message = f"invalid {where or 'request'}: {first.get('msg', 'validation failed')}"
    # The Open Inference Protocol has no 422: a request it cannot take is a 400.
    return JSONResponse(_body(request, message), status_code=400 if _is_v2(request) else 422)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Routing's own errors (404 no such path, 405 wrong method): FastAPI's answer, in the protocol's shape."""
    if not _is_v2(request):
        return await http_exception_handler(request, exc)
    return JSONResponse(_body(request, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnected)
    app.add_exception_handler(Exception, _unexpected)
