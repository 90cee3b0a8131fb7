"""The page at ``/`` for trying the model in a browser (issue 9). It is a plain client of ``/predict`` and
``/model``: every asset is served from ``service/static``, nothing from elsewhere, so it works offline."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service.settings import Settings

STATIC = Path(__file__).resolve().parent / "static"

# The browser enforces what the page promises: scripts, styles and requests from this origin only;
# images also from blob: and data: URLs (the preview of a chosen file, the canvas).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the page at ``/`` and its files under ``/static/``, unless ``settings.ui_enabled`` is off."""
    if not settings.ui_enabled:
        return

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        """The try-it page."""
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
