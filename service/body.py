"""Reading request bodies within the limits every door into the service shares."""

from __future__ import annotations

import asyncio

from fastapi import Request

from service.errors import BodyTimeout, PayloadTooLarge
from service.settings import Settings


async def read_body(request: Request, settings: Settings) -> bytes:
    """The whole body: 413 as soon as it passes ``max_upload_bytes`` (never buffered beyond it), 408 if
    it takes longer than ``body_timeout_s`` to arrive (a client trickling bytes holds no slot for long)."""
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge()
    chunks, size = [], 0
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge()
                chunks.append(chunk)
    except TimeoutError as e:
        raise BodyTimeout() from e
    return b"".join(chunks)
