"""The access log: one line per HTTP request once it is answered (client, method, path, status, duration), on
the ``service.access`` logger. ``create_app`` installs it outermost when ``settings.access_log`` is on, so
``POST /predict`` (answered ahead of FastAPI by ``service.predict``) is logged like every other route.

    2026-12-02 08:30:00,123 INFO service.access: 127.0.0.1:50412 POST /predict 200 3.1ms
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("service.access")


class AccessLog:
    """Pure ASGI middleware (BaseHTTPMiddleware would copy every body through a queue)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

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
            client = scope.get("client")
            log.info("%s %s %s %d %.1fms", f"{client[0]}:{client[1]}" if client else "-", scope["method"],
                     scope["path"], status, (time.perf_counter() - start) * 1000)
