"""What the HTTP doors share: the domain errors' HTTP status codes (one table), each door's error shape, the
state and API-key dependencies, reading a body within the shared limits, noticing a client that left, and the
request metrics middleware. The doors are ``service.routes`` (``{"detail"}`` errors) and ``service.v2`` (the
Open Inference Protocol's ``{"error"}``, 400 where FastAPI would say 422)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
import zlib
from collections.abc import Callable
from http import HTTPStatus
from typing import Annotated

import httptools
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors, metrics
from service.auth import check_admin, check_key
from service.core import ServiceState
from service.settings import Settings

log = logging.getLogger("service")

HTTP_STATUS: dict[type[errors.ServiceError], int] = {
    errors.EmptyBody: 400,
    errors.InvalidImage: 400,
    errors.NoImages: 400,
    errors.InvalidMultipart: 400,
    errors.InvalidInferenceRequest: 400,
    errors.MalformedEncoding: 400,
    errors.Unauthorized: 401,
    errors.AdminDisabled: 403,
    errors.UnknownModel: 404,
    errors.BodyTimeout: 408,
    errors.ReloadFailed: 409,
    errors.PayloadTooLarge: 413,
    errors.ImageTooLarge: 413,
    errors.TooManyImages: 413,
    errors.UnsupportedMediaType: 415,
    errors.UnsupportedContentEncoding: 415,
    errors.QueueFull: 429,
    errors.ClientGone: 499,  # nginx's code; nobody is left to read it
    errors.InferenceFailed: 500,
    errors.ModelNotReady: 503,
    errors.DeadlineExceeded: 504,
}


def status_of(exc: errors.ServiceError) -> int:
    return next((HTTP_STATUS[c] for c in type(exc).__mro__ if c in HTTP_STATUS), 500)


def headers_of(exc: errors.ServiceError) -> dict[str, str]:
    if isinstance(exc, errors.Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, errors.QueueFull):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return {}


def raw_error(exc: errors.ServiceError, key: str) -> bytes:
    """``exc`` as a whole HTTP/1.1 response in a door's shape (what ``error_response`` answers), for the HTTP
    server to write itself before it closes the connection (``service.server``)."""
    status = status_of(exc)
    body = orjson.dumps({key: exc.detail})
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", *(f"{k.lower()}: {v}" for k, v in headers_of(exc).items()),
            "connection: close"]
    return "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body


# (path, state) -> (the door's error key, the route template its metrics use), for a POST the door would run
# inference for; None for any other path
Refusable = Callable[[str, ServiceState], tuple[str, str] | None]


def early_refusal(app: FastAPI, doors: list[Refusable]) -> Callable[
        [bytes, bytes, list[tuple[bytes, bytes]], tuple[str, int] | None], bytes | None]:
    """For the HTTP server (``service.server``): the whole 429 answer to an inference POST that admission refuses
    right now, decided from the request's head, else None (the route serves it). Counted and logged as the route
    would be; a request the route would answer otherwise (401, 404, 413, 503 while loading or draining, a chunked
    body) is left to it."""
    from service import access_log  # it builds on this module's middleware

    counted: dict[str, tuple] = {}

    def refuse(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
               client: tuple[str, int] | None) -> bytes | None:
        if method != b"POST":
            return None
        start = time.perf_counter()
        state: ServiceState | None = getattr(app.state, "service", None)
        if state is None or not state.ready or state.batcher is None:
            return None
        exc = state.batcher.refusal(1)
        if exc is None:  # admitted: what most requests learn here, so it is asked first
            return None
        path = httptools.parse_url(target).path.decode("latin-1")
        door = next((d for d in (refusable(path, state) for refusable in doors) if d is not None), None)
        if door is None:
            return None
        found = {k: v for k, v in headers if k in (b"content-length", b"authorization")}
        declared = found.get(b"content-length")
        if declared is None or not declared.isdigit() or int(declared) > state.settings.max_upload_bytes:
            return None
        authorization = found.get(b"authorization")
        try:
            check_key(state.settings.api_keys, authorization.decode("latin-1") if authorization else None)
        except errors.Unauthorized:
            return None
        key, template = door
        answer = raw_error(exc, key)
        seconds = time.perf_counter() - start
        if template not in counted:
            counted[template] = (metrics.REQUESTS.labels(template, "POST", "429"),
                                 metrics.REQUEST_LATENCY.labels(template))
        requests, latency = counted[template]
        requests.inc()
        latency.observe(seconds)
        if state.settings.access_log:
            access_log.record(client, "POST", path, 429, seconds)
        return answer

    return refuse


def error_response(method: str, path: str, exc: Exception, key: str, validation_status: int) -> Response:
    """Any failure of a request as the door's error body ``{key: message}``; 5xx but 503/504 carry an
    ``error_id`` that is also in the log, beside the cause."""
    headers: dict[str, str] = {}
    if isinstance(exc, ClientDisconnect):  # the client left while its body was read: their doing
        exc = errors.ClientGone()
    if isinstance(exc, errors.ServiceError):
        status, message, headers = status_of(exc), exc.detail, headers_of(exc)
    elif isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body", "header"))
        status, message = validation_status, f"invalid {where or 'request'}: {first.get('msg', 'validation failed')}"
    elif isinstance(exc, HTTPException):
        status, message, headers = exc.status_code, str(exc.detail), dict(exc.headers or {})
    else:
        error_id = uuid.uuid4().hex[:12]
        log.error("error_id=%s unexpected failure on %s %s", error_id, method, path, exc_info=exc)
        return JSONResponse({key: "internal error", "error_id": error_id}, status_code=500)
    body = {key: message}
    if status >= 500 and status not in (503, 504):
        body["error_id"] = error_id = uuid.uuid4().hex[:12]
        log.error("error_id=%s %s %s: %s", error_id, method, path, exc.__cause__ or exc)
    return JSONResponse(body, status_code=status, headers=headers)


def door_route(key: str, validation_status: int) -> type[APIRoute]:
    """A route class whose handler answers every failure in this door's shape: the one place a door maps errors."""

    class DoorRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:  # noqa: BLE001 - every failure becomes this door's error answer
                    return error_response(request.method, request.url.path, exc, key, validation_status)

            return handle

    return DoorRoute


# --- dependencies -----------------------------------------------------------------------------------------------


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def require_api_key(request: Request) -> None:
    # async, though it awaits nothing: FastAPI runs a plain def dependency in its thread pool, a hop that costs
    # more than the check.
    check_key(request.app.state.service.settings.api_keys, request.headers.get("authorization"))


async def require_admin(request: Request) -> None:
    check_admin(request.app.state.service.settings.api_keys, request.headers.get("authorization"))


State = Annotated[ServiceState, Depends(get_state)]
Authorized = Annotated[None, Depends(require_api_key)]
Admin = Annotated[None, Depends(require_admin)]


# --- bodies and clients -----------------------------------------------------------------------------------------


# zlib's window bits for each Content-Encoding we inflate: gzip's header, and deflate as RFC 9110 means it (the
# zlib format; 32 also takes a gzip header, which some clients send under that name).
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": 32 + zlib.MAX_WBITS}


async def read_body(receive: Receive, headers: Headers, settings: Settings) -> bytes:
    """The whole body, within the limits every HTTP door shares: ``PayloadTooLarge`` as soon as it passes
    ``max_upload_bytes`` (never buffered beyond it), ``BodyTimeout`` if it takes longer than ``body_timeout_s``
    (a client trickling bytes holds no slot for long). A gzip or deflate body is inflated as it arrives, and the
    limit holds for the inflated bytes: a bomb stops at the limit, having cost that much memory and no more."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity" and encoding not in ENCODINGS:
        raise errors.UnsupportedContentEncoding()
    inflater = zlib.decompressobj(ENCODINGS[encoding]) if encoding in ENCODINGS else None
    limit = settings.max_upload_bytes
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.PayloadTooLarge(limit)
    chunks, received, size = [], 0, 0
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise errors.PayloadTooLarge(limit)
                if inflater is not None:
                    chunk = inflate(inflater, chunk, limit - size, limit)
                size += len(chunk)
                if size > limit:
                    raise errors.PayloadTooLarge(limit)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError as e:
        raise errors.BodyTimeout() from e
    if inflater is not None and received and (not inflater.eof or inflater.unused_data):
        raise errors.MalformedEncoding()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def inflate(inflater: zlib._Decompress, chunk: bytes, room: int, limit: int) -> bytes:
    """``chunk`` inflated, but never more than ``room`` + 1 bytes (one past is enough to know it is too large)."""
    try:
        out = inflater.decompress(chunk, room + 1)
    except zlib.error as e:
        raise errors.MalformedEncoding() from e
    if inflater.unconsumed_tail:  # more output is waiting than there is room for
        raise errors.PayloadTooLarge(limit)
    return out


async def disconnected(receive: Receive) -> None:
    """Resolves when the client disconnects (the body has been read, so the next message is that): the core's
    "client gone" awaitable."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# --- the app around the doors -----------------------------------------------------------------------------------


class AnsweredRequests:
    """Pure ASGI middleware (BaseHTTPMiddleware would copy every body through a queue) that calls ``answered``
    with each HTTP request's status and duration once it is answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def answered(self, scope: Scope, status: int, seconds: float) -> None:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server answers when the app raises before it started a response

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.answered(scope, status, time.perf_counter() - start)


class RequestMetrics(AnsweredRequests):
    """Requests by route template and status, and their latency."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        self.templates: dict[int, str] = {}  # id of an endpoint -> its route's path template

    def template(self, scope: Scope) -> str:
        """The route template the request matched. FastAPI puts the route in the scope only for its own
        APIRoutes; /docs, /openapi.json and mounts (/static) are Starlette routes, known by their endpoint."""
        route = scope.get("route")
        if route is not None:
            return route.path
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return "unmatched"
        if id(endpoint) not in self.templates:
            for candidate in scope["app"].router.routes:
                if isinstance(candidate, Route | Mount):
                    target = candidate.endpoint if isinstance(candidate, Route) else candidate.app
                    self.templates[id(target)] = candidate.path
        return self.templates.get(id(endpoint), "unmatched")

    def answered(self, scope: Scope, status: int, seconds: float) -> None:
        template = self.template(scope)
        metrics.REQUESTS.labels(template, scope["method"], str(status)).inc()
        metrics.REQUEST_LATENCY.labels(template).observe(seconds)


def install(app: FastAPI) -> None:
    """Outside the doors (the page's files, the docs): an unexpected failure is still a JSON 500 with an id."""
    app.add_middleware(RequestMetrics)

    async def unexpected(request: Request, exc: Exception) -> Response:
        return error_response(request.method, request.url.path, exc, "detail", 422)

    app.add_exception_handler(Exception, unexpected)
