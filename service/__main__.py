"""``python -m service`` (or ``resnet-serve``): serve with host, port, workers and log level from settings.
One worker runs in this process; several run under ``service.supervisor``. SIGTERM drains: readiness turns
503, accepted requests finish (up to ``drain_timeout_s``), then the process exits 0."""

from __future__ import annotations

import atexit
import logging
import socket
import sys
from collections.abc import Callable
from typing import IO

import uvicorn
from starlette.applications import Starlette

from service import access_log, predict, v2
from service.activity import Activity
from service.app import create_app
from service.balance import ConnectionShares
from service.http import early_refusal
from service.lifecycle import keep_clean_exit_after_drain
from service.server import capped_head
from service.settings import Settings


def configure_logging(settings: Settings, stream: IO[str] | None = None) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=stream, force=stream is not None)
    if settings.access_log:
        # Its own switch (RESNET_ACCESS_LOG): a quieter RESNET_LOG_LEVEL does not silence it.
        access_log.log.setLevel(logging.INFO)
        if not access_log.log.handlers:
            atexit.register(access_log.BackgroundWriter().start().stop)


def uvicorn_config(settings: Settings, app: Starlette, shares: ConnectionShares | None = None) -> uvicorn.Config:
    """How uvicorn serves ``app``: the capped request head, the early 429 and a supervised worker's share of the
    connections (``service.server``), no access log of its own."""
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        # uvicorn's own access log is off: service.access_log writes one, with the status and the duration.
        timeout_graceful_shutdown=settings.drain_timeout_s, access_log=False,
        http=capped_head(settings.max_header_bytes, early_refusal(app, [predict.refusable, v2.refusable]), shares),
    )


class Server(uvicorn.Server):
    """uvicorn's server, which drains as soon as it has started when a SIGTERM came before it could see one
    (``stop_requested``, from ``keep_clean_exit_after_drain``)."""

    def __init__(self, config: uvicorn.Config, stop_requested: Callable[[], bool] = lambda: False) -> None:
        super().__init__(config)
        self.stop_requested = stop_requested

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.stop_requested():
            self.should_exit = True  # uvicorn then skips its main loop and shuts down gracefully
        await super().startup(sockets)


class SharingServer(Server):
    """A supervised worker's server: it takes a share of the connections from the moment its socket listens (after
    the lifespan's startup, so once the model is ready) until its drain begins."""

    def __init__(self, config: uvicorn.Config, shares: ConnectionShares,
                 stop_requested: Callable[[], bool] = lambda: False) -> None:
        super().__init__(config, stop_requested)
        self.shares = shares

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self.shares.listen(len(self.server_state.connections))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.shares.stop_listening()
        await super().shutdown(sockets)


def run_server(settings: Settings, sockets: list[socket.socket] | None = None, supervised: bool = False,
               shares: ConnectionShares | None = None, activity: Activity | None = None) -> None:
    """uvicorn serving ``create_app(settings)`` in this process, on ``sockets`` or on host:port; ``shares`` and
    ``activity``: this worker's cells of the supervisor's connection shares and of its record of who holds images."""
    stop_requested = keep_clean_exit_after_drain()
    config = uvicorn_config(settings, create_app(settings, supervised=supervised, activity=activity), shares)
    server = Server(config, stop_requested) if shares is None else SharingServer(config, shares, stop_requested)
    server.run(sockets=sockets)


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    if settings.effective_workers == 1:
        run_server(settings)
        return
    from service.supervisor import Supervisor

    sys.exit(Supervisor(settings).run())


if __name__ == "__main__":
    main()
