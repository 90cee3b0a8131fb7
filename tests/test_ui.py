"""The try-it page (issue 9), served by the service itself."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.ui import STATIC
from tests.conftest import ROOT

# --- the page over plain HTTP ---------------------------------------------------------------------


class AssetRefs(HTMLParser):
    """Every URL the page's markup points at (src, href)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.fixture(scope="module")
def http(default_model) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_path=default_model, max_batch_size=1))) as client:
        yield client


def test_index_serves_page_with_only_its_own_assets(http):
    r = http.get("/")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    parser = AssetRefs()
    parser.feed(r.text)
    assets = [u for u in parser.urls if u.startswith("static/")]
    assert sorted(assets) == ["static/app.js", "static/style.css"], parser.urls
    for asset in assets:
        a = http.get("/" + asset)
        assert a.status_code == 200, asset
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", a.text, re.I), f"{asset} refers elsewhere"
    external = [u for u in parser.urls if re.match(r"(https?:)?//", u, re.I)]
    assert not external, external


def test_index_404_when_ui_disabled(default_model):
    with TestClient(create_app(Settings(model_path=default_model, max_batch_size=1, ui_enabled=False))) as client:
        for path in ("/", "/static/app.js", "/static/index.html"):
            r = client.get(path)
            assert r.status_code == 404, (path, r.text)
        assert client.get("/health/live").status_code == 200


def test_ui_enabled_read_from_environment(monkeypatch):
    monkeypatch.setenv("RESNET_UI_ENABLED", "false")
    assert Settings().ui_enabled is False


def test_openapi_leaves_out_page_and_static(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert "/predict" in paths
    assert not [p for p in paths if p == "/" or p.startswith("/static")], list(paths)


def test_static_files_are_package_data():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["service"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert {"static/index.html", "static/app.js", "static/style.css"} <= set(files)
    assert all(any(fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)
