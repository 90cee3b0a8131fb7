"""``/docs``: Swagger UI for the service's OpenAPI schema, every file of it served by the service itself (the
JS, CSS and icon ship in the ``fastapi-offline`` package), so the page works offline and in an air-gapped
cluster, under a Content-Security-Policy as strict as the try-it page's (``service.ui``)."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, ...
PATH = "/docs"


def inline_script_hashes(html: str) -> list[str]:
    """CSP sources for the page's inline scripts (the one that starts Swagger UI): those run, no others."""
    return [f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
            for s in re.findall(r"<script>(.*?)</script>", html, re.S)]


def page(title: str) -> tuple[bytes, str]:
    """The page and its Content-Security-Policy. URLs are relative to /docs, so the page also works behind a
    proxy that serves the service under a prefix."""
    html = get_swagger_ui_html(
        openapi_url="openapi.json", title=title, swagger_js_url="docs/assets/swagger-ui-bundle.js",
        swagger_css_url="docs/assets/swagger-ui.css", swagger_favicon_url="docs/assets/favicon.png",
        oauth2_redirect_url=None,  # the API takes bearer keys, no OAuth2 flow
        swagger_ui_parameters={"validatorUrl": None},  # Swagger UI would otherwise ask validator.swagger.io
    ).body.decode()
    csp = (f"default-src 'self'; script-src 'self' {' '.join(inline_script_hashes(html))}; img-src 'self' data:; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), csp


def install(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` and its files under ``/docs/assets``; create the app with ``docs_url=None``
    (FastAPI's own page loads them from a CDN) and ``redoc_url=None`` (so does ReDoc's, fonts included)."""
    html, csp = page(f"{app.title} - Swagger UI")

    @app.get(PATH, include_in_schema=False)
    async def docs() -> HTMLResponse:
        """Swagger UI."""
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    app.mount(PATH + "/assets", StaticFiles(directory=ASSETS), name="docs-assets")
