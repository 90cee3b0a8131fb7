"""``POST /predict``, the hot path, as a plain ASGI endpoint in front of the FastAPI app.

Each request here skips what the route does not need: Starlette's middleware stack (and FastAPI's own layers in
it), routing, dependency resolution and a Response object. It reads the body within the shared limits, calls the
core, and answers with orjson. The FastAPI route of the same path (``service.routes``) documents the operation in
OpenAPI and answers the same way where this endpoint is not in front.
"""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import parse_qsl

import numpy as np
import orjson
from pydantic import Field, TypeAdapter, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from service import metrics
from service.auth import check_key
from service.core import Classification, ServiceState, classify_images
from service.errors import EmptyBody, InvalidMultipart, NoImages, TooManyImages, UnsupportedMediaType
from service.http import disconnected, error_response, read_body
from service.runtime import softmax
from service.settings import Settings

PATH = "/predict"
RAW_TYPES = ("application/octet-stream", "application/x-www-form-urlencoded")  # the latter: curl --data-binary
TopK = Annotated[int, Field(ge=1, le=1000, description="classes to list, capped at the class count")]
TOP_K = TypeAdapter(TopK)


class InvalidTopK(ValueError):
    pass


def top_k_of(query_string: bytes) -> int:
    """The ``top_k`` query parameter, validated as FastAPI would (the same messages)."""
    value = 5
    if not query_string:
        return value
    # Blank values kept: ``top_k=`` is an invalid integer (422), as FastAPI has it, not the default.
    for key, raw in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key == "top_k":
            value = raw
    try:
        return TOP_K.validate_python(value, strict=False)
    except ValidationError as e:
        raise InvalidTopK(f"invalid top_k: {e.errors()[0]['msg']}") from e


class FileParts:
    """The file parts of a multipart/form-data body already in memory, as bytes, in order: python-multipart's parser
    (the one Starlette uses) without Starlette's spooled temporary file per part, which cost more than the parsing
    for a batch of small images (docs/throughput.md#multipart-parsing-2026-12-03-afternoon). Parts without a
    filename are form fields: counted and size-checked as Starlette does, then dropped."""

    MAX_FIELDS = 100
    MAX_FIELD_BYTES = 2**20

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.files: list[bytes] = []
        self.fields = 0
        self._chunks: list[bytes] = []
        self._size = 0
        self._is_file = False
        self._header_name = self._header_value = b""
        self._disposition = b""

    def on_part_begin(self) -> None:
        self._chunks, self._size, self._disposition = [], 0, b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidMultipart()
        self._is_file = b"filename" in options
        if self._is_file and len(self.files) >= self.max_files:
            raise TooManyImages(self.max_files)
        if not self._is_file:
            self.fields += 1
            if self.fields > self.MAX_FIELDS:
                raise InvalidMultipart()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self._chunks.append(data[start:end])
            return
        self._size += end - start
        if self._size > self.MAX_FIELD_BYTES:
            raise InvalidMultipart()

    def on_part_end(self) -> None:
        if self._is_file:
            self.files.append(self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks))

    @classmethod
    def parse(cls, body: bytes, content_type: str, max_files: int) -> list[bytes]:
        """``TooManyImages`` past ``max_files`` (the parser stops there, so a form of many tiny parts is not parsed to
        the end); ``InvalidMultipart`` for anything malformed."""
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise InvalidMultipart()
        parts = cls(max_files)
        callbacks = {name: getattr(parts, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
            "on_part_data", "on_part_end")}
        try:
            parser = MultipartParser(boundary, callbacks)
            parser.write(body)
            parser.finalize()
        except FormParserError as e:
            raise InvalidMultipart() from e
        return parts.files


async def read_images(receive: Receive, headers: Headers, settings: Settings) -> list[bytes]:
    """The image payloads of a request: a raw body, or the file parts of a multipart form, in order."""
    content_type = headers.get("content-type", "application/octet-stream")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "multipart/form-data" and not (media.startswith("image/") or media in RAW_TYPES):
        raise UnsupportedMediaType()
    body = await read_body(receive, headers, settings)
    if not body:
        raise EmptyBody()
    if media != "multipart/form-data":
        return [body]
    images = FileParts.parse(body, content_type, settings.max_batch_images)
    if not images:
        raise NoImages()
    empty = next((i for i, data in enumerate(images) if not data), None)
    if empty is not None:
        error = EmptyBody("empty file part")
        raise error.about(f"image {empty + 1} of {len(images)}") if len(images) > 1 else error
    return images


def prediction(classification: Classification, top_k: int, started: float) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The response body (JSON) and headers."""
    model = classification.model
    spec = model.spec
    probs = softmax(classification.logits)  # (N, classes), float64
    k = min(top_k, len(spec.labels))
    orders = np.argsort(-probs, axis=1, kind="stable")[:, :k].tolist()  # one numpy call for the whole batch
    labels = spec.labels
    predictions = [
        {"probabilities": p, "top_k": [{"label": labels[i], "index": i, "probability": p[i]} for i in order]}
        for p, order in zip(probs.tolist(), orders, strict=True)
    ]
    body = orjson.dumps({"model": {"name": spec.name, "version": spec.version}, "provider": model.provider,
                         "predictions": predictions})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"server-timing", classification.server_timing(started).encode()),
        (b"x-model-name", spec.name.encode()),
        (b"x-model-version", spec.version.encode()),
        (b"x-inference-provider", model.provider.encode()),
    ]
    return body, headers


async def handle(state: ServiceState, scope: Scope, receive: Receive) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Classify one image (raw body) or several (multipart file parts); probabilities per image."""
    started = time.perf_counter()
    headers = Headers(scope=scope)
    check_key(state.settings.api_keys, headers.get("authorization"))
    top_k = top_k_of(scope.get("query_string", b""))
    state.require_ready()
    images = await read_images(receive, headers, state.settings)
    classification = await classify_images(state, images, disconnected(receive))
    return prediction(classification, top_k, started)


def refusable(path: str, state: ServiceState) -> tuple[str, str] | None:
    """For ``service.http.early_refusal``: (error key, route template) when a POST to ``path`` is this door's
    inference, which admission may refuse from the request's head."""
    return ("detail", PATH) if path == PATH else None


class PredictEndpoint:
    """``POST /predict`` as a plain ASGI app: ``service.app.Service`` calls it ahead of FastAPI's stack."""

    def __init__(self) -> None:
        self.latency = metrics.REQUEST_LATENCY.labels(PATH)
        self.ok = metrics.REQUESTS.labels(PATH, "POST", "200")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        state: ServiceState = scope["app"].state.service
        try:
            body, headers = await handle(state, scope, receive)
        except InvalidTopK as e:
            await self.fail(scope, receive, send, 422, orjson.dumps({"detail": str(e)}), start)
            return
        except Exception as exc:  # noqa: BLE001 - every failure becomes this door's error answer
            response = error_response("POST", PATH, exc, "detail", 422)
            await response(scope, receive, send)
            self.observe(response.status_code, start)
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self.ok.inc()
        self.latency.observe(time.perf_counter() - start)

    async def fail(self, scope: Scope, receive: Receive, send: Send, status: int, body: bytes, start: float) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        self.observe(status, start)

    def observe(self, status: int, start: float) -> None:
        metrics.REQUESTS.labels(PATH, "POST", str(status)).inc()
        self.latency.observe(time.perf_counter() - start)
