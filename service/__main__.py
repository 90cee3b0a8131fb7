"""``python -m service`` (or ``resnet-serve``): run uvicorn with host, port, workers and log level from
settings. SIGTERM drains: readiness turns 503, accepted requests finish (up to ``drain_timeout_s``),
then the process exits 0."""

from __future__ import annotations

import logging

import uvicorn

from service.app import create_app
from service.lifecycle import keep_clean_exit_after_drain
from service.settings import Settings


def app_factory():
    """For worker processes, which each build their own app (and onnxruntime session)."""
    return create_app(Settings())


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_clean_exit_after_drain()
    app = "service.__main__:app_factory" if settings.workers > 1 else create_app(settings)
    uvicorn.run(
        app,
        factory=settings.workers > 1,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_timeout_s,
        access_log=settings.log_level == "debug",
    )


if __name__ == "__main__":
    main()
