"""The access log: one line per HTTP request once it is answered (client, method, path, status, duration), on
the ``service.access`` logger. ``create_app`` installs it outermost when ``settings.access_log`` is on, so
``POST /predict`` (answered ahead of FastAPI by ``service.predict``) is logged like every other route.

    2026-12-02 08:30:00,123 INFO service.access: 127.0.0.1:50412 POST /predict 200 3.1ms
"""

from __future__ import annotations

import logging

from starlette.types import Scope

from service.http import AnsweredRequests

log = logging.getLogger("service.access")


class AccessLog(AnsweredRequests):
    def answered(self, scope: Scope, status: int, seconds: float) -> None:
        client = scope.get("client")
        log.info("%s %s %s %d %.1fms", f"{client[0]}:{client[1]}" if client else "-", scope["method"], scope["path"],
                 status, seconds * 1000)
