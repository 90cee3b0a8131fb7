"""The try-it page (issue 9): served by the service itself, and used end to end in a real headless Chromium
against ``python -m service``."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bench.harness import Server, serve_service
from evalsets.drawn_digits import generate as drawn_set
from service.app import create_app
from service.settings import Settings
from service.ui import STATIC
from tests.conftest import ROOT
from tests.images import encode, one_per_class

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UPLOAD_LIMIT = 200_000  # small enough that the 413 case needs only a modest file


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


def test_docs_serves_swagger_ui_and_every_asset_from_the_service(http):
    r = http.get("/docs")
    assert r.status_code == 200, r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp, csp
    parser = AssetRefs()
    parser.feed(r.text)
    external = [u for u in parser.urls if re.match(r"(https?:)?//", u, re.I)]
    assert not external, external
    assets = {urljoin("/docs", u) for u in parser.urls}
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"} <= assets, parser.urls
    for asset in sorted(assets) + ["/openapi.json"]:
        a = http.get(asset)
        assert a.status_code == 200, (asset, a.text[:200])


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


# --- the page in a browser --------------------------------------------------------------------------


def require_browser() -> None:
    """Skip where the browser is missing, loudly; in CI (CI=true) that is a failure, never a skip."""
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing: install it with .ci/prepare-browser.sh (Debian's chromium package)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright is not installed: pip install -e '.[dev]'"
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser tests must run in CI, but {missing}")
    pytest.skip(f"BROWSER TESTS NOT RUN: {missing}")


@pytest.mark.parametrize(("ci", "outcome"), [pytest.param("true", pytest.fail.Exception, id="ci"),
                                              pytest.param(None, pytest.skip.Exception, id="local")])
def test_missing_browser_fails_in_ci_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", Path("/nonexistent/chromium"))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="/nonexistent/chromium is missing"):
        require_browser()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """One ``python -m service`` for the module (the same process the ``live_server`` fixture runs); each test
    gets a fresh browser page against it."""
    require_browser()
    env = {"RESNET_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT), "RESNET_MAX_BATCH_SIZE": "4"}
    with serve_service(env, tmp_path_factory.mktemp("ui-server") / "server.log") as live:
        yield live


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def screenshots() -> Path:
    """Where the page is photographed after its predictions, to look at (build/ is git-ignored). Not the pytest
    tmp dir: that is pruned after a few runs, by anyone's pytest on a shared machine."""
    folder = ROOT / "build" / "ui-screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class PageLog:
    requests: list[str] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)

    def check(self, server: Server) -> None:
        assert not self.script_errors, self.script_errors
        elsewhere = [u for u in self.requests if not u.startswith((server.url + "/", "blob:", "data:"))]
        assert not elsewhere, f"the page fetched from somewhere other than the service: {elsewhere}"


def open_page(browser, server: Server, *, card: bool = True, **context_options):
    """The page, loaded (with its model card, if ``card``), and a log of every request it makes and every script
    error."""
    from playwright.sync_api import expect

    log = PageLog()
    page = browser.new_context(**context_options).new_page()
    page.on("request", lambda req: log.requests.append(req.url))
    page.on("pageerror", lambda err: log.script_errors.append(str(err)))
    page.on("console", lambda msg: "Content Security Policy" in msg.text and log.script_errors.append(msg.text))
    page.goto(server.url + "/")
    if card:
        expect(page.locator("#card-arch")).to_have_text("resnet20")
    return page, log


@pytest.fixture
def page(browser, server):
    page, log = open_page(browser, server, viewport={"width": 1280, "height": 900})
    yield page
    page.context.close()
    log.check(server)


def digit_file(tmp_path: Path, index: int) -> tuple[Path, int]:
    img, label = one_per_class()[index]
    path = tmp_path / f"digit{label}.png"
    img.save(path, "PNG")
    return path, label


def draw(page, points: list[tuple[float, float]]) -> None:
    """One stroke with the mouse through ``points`` (fractions of the canvas's width and height)."""
    box = page.get_by_role("img", name=re.compile("Drawing area")).bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for xy in at[1:]:
        page.mouse.move(*xy, steps=5)
    page.mouse.up()


def test_page_shows_model_card(page, server):
    from playwright.sync_api import expect

    card = httpx.get(server.url + "/model").json()
    expect(page.locator("#card-arch")).to_have_text("resnet20")
    expect(page.locator("#card-labels")).to_have_text("0, 1, 2, 3, 4, 5, 6, 7, 8, 9 (10 classes)")
    expect(page.locator("#card-input")).to_have_text("32×32, colour mode L")
    expect(page.locator("#card-accuracy")).to_have_text(f"{card['val_accuracy'] * 100:.2f}%")
    expect(page.locator("#card-provider")).to_have_text("CPU (CPUExecutionProvider)")
    expect(page.locator("#card-version")).to_have_text(card["version"])


def test_upload_digit_shows_its_label_on_top(page, tmp_path, screenshots):
    from playwright.sync_api import expect

    for index in range(len(one_per_class())):
        path, label = digit_file(tmp_path, index)
        with page.expect_response("**/predict?*") as answer:
            page.get_by_label("Choose an image file").set_input_files(path)
        assert answer.value.request.headers["content-type"] == "image/png"
        expect(page.get_by_role("status")).to_contain_text(f"{path.name}: {label} (")
        expect(page.locator("#bars li").first.locator(".bar-label")).to_have_text(str(label))
    expect(page.locator("#bars li")).to_have_count(5)
    assert re.fullmatch(r"\d+\.\d%|<0\.1%", page.locator("#bars .bar-value").first.inner_text())

    total = float(re.search(r"total;dur=([\d.]+)", answer.value.headers["server-timing"]).group(1))
    latency = page.locator("#latency").inner_text()
    shown = re.search(r"Service: ([\d.]+) ms", latency)
    assert shown and abs(float(shown.group(1)) - total) < 1, (latency, total)
    assert re.search(r"round trip: [\d.]+ ms", latency), latency

    rows = page.locator("#distribution-rows tr")
    expect(rows.first).to_be_hidden()
    page.get_by_text("All 10 classes").click()
    expect(rows).to_have_count(10)
    expect(rows.nth(9).locator("th")).to_have_text("9")
    page.screenshot(path=screenshots / "upload.png", full_page=True)


# A DataTransfer holding the file, handed to the page as a drop on the file area or a paste (Ctrl+V).
DELIVER = {
    "drop": """([bytes, name]) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], name, {type: "image/png"}));
        document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
    }""",
    "paste": """([bytes, name]) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], name, {type: "image/png"}));
        document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true}));
    }""",
}


@pytest.mark.parametrize("how", list(DELIVER))
def test_dropped_or_pasted_digit_is_classified(page, how):
    from playwright.sync_api import expect

    img, label = one_per_class()[8]
    with page.expect_response("**/predict?*") as answer:
        page.evaluate(DELIVER[how], [list(encode(img, "PNG")), f"{how}.png"])
    assert answer.value.status == 200
    expect(page.get_by_role("status")).to_contain_text(f"{how}.png: {label} (")


def test_drawing_sends_white_ink_on_black_png(page, screenshots):
    from playwright.sync_api import expect

    sent = []

    def keep(route) -> None:  # an intercepted request carries its blob body; an observed one may not yet
        sent.append(route.request)
        route.continue_()

    page.route("**/predict?*", keep)
    draw(page, [(0.5, 0.15), (0.5, 0.5), (0.5, 0.85)])
    expect(page.get_by_role("status")).not_to_have_text("No image yet.")
    (request,) = sent
    assert request.headers["content-type"] == "image/png"
    drawing = np.asarray(Image.open(io.BytesIO(request.post_data_buffer)).convert("L"))
    assert drawing.shape == (280, 280)
    ink = drawing > 127
    assert 0.02 < ink.mean() < 0.2, ink.mean()  # a stroke about 28 px wide and 200 px long on black
    assert ink[140, 140] and not ink[140, 40] and not ink[0, 0]
    # A vertical bar is a "1" to the digits model; a blank or inverted canvas would not be.
    expect(page.get_by_role("status")).to_contain_text("Your drawing: 1 (")
    page.screenshot(path=screenshots / "drawing.png", full_page=True)

    page.get_by_role("button", name="Clear drawing").click()
    cleared = np.asarray(Image.open(io.BytesIO(page.locator("#canvas").screenshot())).convert("L"))
    assert cleared[5:-5, 5:-5].max() < 30, "the stroke is still on the canvas after Clear"


# One drawing per digit from the drawn-digits set (evalsets/drawn_digits), chosen by rule, not by result: the
# first variation of style (digit mod 3).
REDRAWN = [f"{d}-{list(drawn_set.STYLES[d])[d % 3]}-00" for d in range(10)]
MAX_MISREAD = 1  # of the 10: the default model read 100% of the set, other seeds of its recipe 99.4% (docs/training.md)


@pytest.fixture(scope="module")
def redrawn(browser, server) -> list[tuple[dict, bytes, dict, str]]:
    """The REDRAWN drawings drawn again with the mouse on the page: the stored entry, the PNG the page sent after
    the last stroke, the service's answer to it, and what the page then showed."""
    from playwright.sync_api import expect

    stored = {d["id"]: d for d in json.loads(drawn_set.STROKES.read_text())["drawings"]}
    page, log = open_page(browser, server, viewport=drawn_set.VIEWPORT)
    sent = drawn_set.capture(page)
    out = []
    try:
        for key in REDRAWN:
            png, answer = drawn_set.draw(page, sent, stored[key]["strokes"])
            top = answer["predictions"][0]["top_k"][0]["label"]
            status = page.get_by_role("status")
            expect(status).to_contain_text(f"Your drawing: {top} (")
            out.append((stored[key], png, answer, status.inner_text()))
    finally:
        page.context.close()
    log.check(server)
    return out


def test_redrawn_set_drawings_match_their_stored_pngs(redrawn):
    for item, png, _, _ in redrawn:
        again = drawn_set.png_pixels(png).astype(int)
        kept = drawn_set.png_pixels((drawn_set.PNG_DIR / f"{item['id']}.png").read_bytes()).astype(int)
        assert again.shape == kept.shape == (280, 280), item["id"]
        diff = np.abs(again - kept)
        assert diff.mean() < 0.5, f"{item['id']}: the page drew it otherwise (mean |difference| {diff.mean():.2f})"


def test_drawing_each_digit_shows_its_label(redrawn):
    read = {item["id"]: answer["predictions"][0]["top_k"][0]["label"] for item, _, answer, _ in redrawn}
    wrong = {key: label for key, label in read.items() if label != key.split("-")[0]}
    assert len(wrong) <= MAX_MISREAD, f"misread (id: answer): {wrong}"


def noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "RGB"), "PNG")


@pytest.mark.parametrize(
    ("name", "mime", "content", "message"),
    [
        pytest.param("notes.txt", "text/plain", b"not an image\n", "The service answered 415: unsupported content "
                     "type: send image/*, application/octet-stream or multipart/form-data", id="text-file"),
        pytest.param("fake.png", "image/png", b"not an image\n", "The service answered 400: could not decode image",
                     id="not-really-png"),
        pytest.param("huge.png", "image/png", noise_png(400), "The service answered 413: body too large: limit "
                     f"{UPLOAD_LIMIT} bytes (RESNET_MAX_UPLOAD_BYTES)",
                     id="too-large"),
    ],
)
def test_service_error_shown_as_its_detail(page, tmp_path, name, mime, content, message):
    from playwright.sync_api import expect

    assert name != "huge.png" or len(content) > UPLOAD_LIMIT
    path, _ = digit_file(tmp_path, 4)
    page.get_by_label("Choose an image file").set_input_files(path)
    expect(page.locator("#bars")).to_be_visible()
    page.get_by_label("Choose an image file").set_input_files({"name": name, "mimeType": mime, "buffer": content})
    status = page.get_by_role("status")
    expect(status).to_have_text(message)
    expect(status).to_have_class(re.compile(r"\berror\b"))
    expect(page.locator("#bars")).to_be_hidden()  # the previous answer is gone, not left to mislead


def test_docs_page_renders_offline_under_its_csp(browser, server):
    from playwright.sync_api import expect

    log = PageLog()
    context = browser.new_context()
    # Offline: anything not from the service fails, as in an air-gapped cluster.
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url + "/")
                  else route.abort())
    page = context.new_page()
    page.on("request", lambda req: log.requests.append(req.url))
    page.on("pageerror", lambda err: log.script_errors.append(str(err)))
    page.on("console", lambda msg: "Content Security Policy" in msg.text and log.script_errors.append(msg.text))
    page.goto(server.url + "/docs")
    expect(page.locator('.opblock-summary-path[data-path="/predict"]')).to_be_visible()
    context.close()
    log.check(server)


def test_page_usable_from_keyboard(page, tmp_path):
    from playwright.sync_api import expect

    path, label = digit_file(tmp_path, 6)
    # Subscribing turns on the browser's file-chooser interception, asynchronously: done before the Tabs so that it
    # is on when Space lands (CI once lost that race on a loaded machine).
    choosers = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "file":
            break
    else:
        raise AssertionError("Tab never reached the file input")
    for _ in range(3):
        page.keyboard.press("Space")
        deadline = time.monotonic() + 5
        while not choosers and time.monotonic() < deadline:
            page.wait_for_timeout(50)
        if choosers:
            break
        assert page.evaluate("document.activeElement.id") == "file", "focus left the file input"
    assert choosers, "Space on the focused file input never opened a file chooser"
    choosers[0].set_files(path)
    expect(page.get_by_role("status")).to_contain_text(f"{path.name}: {label} (")

    page.get_by_label("Classes to show").fill("3")
    page.keyboard.press("Tab")  # commits the number (the page asks again for the same image), on to the details
    expect(page.locator("#bars li")).to_have_count(3)
    assert page.evaluate("document.activeElement.textContent") == "All 10 classes"
    page.keyboard.press("Enter")
    expect(page.locator("#distribution-rows tr")).to_have_count(10)
    expect(page.locator("#distribution-rows tr").first).to_be_visible()


def test_page_fits_a_phone_and_takes_a_finger(browser, server, screenshots):
    from playwright.sync_api import expect

    page, log = open_page(browser, server, viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    try:
        box = page.locator("#canvas").bounding_box()
        page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        expect(page.get_by_role("status")).to_contain_text("Your drawing: ")
        expect(page.locator("#bars li")).to_have_count(5)
        assert page.evaluate("document.documentElement.scrollWidth") <= 360, "the page scrolls sideways on a phone"
        page.screenshot(path=screenshots / "phone.png", full_page=True)
    finally:
        page.context.close()
    log.check(server)


def test_page_asks_for_api_key_when_service_needs_one(browser, live_server, tmp_path):
    from playwright.sync_api import expect

    key = "correct-horse-battery-staple"
    server = live_server(RESNET_API_KEYS=key, RESNET_MAX_BATCH_SIZE="1")
    page, log = open_page(browser, server, card=False, viewport={"width": 1280, "height": 900})
    try:
        expect(page.locator("#model-status")).to_have_text(
            "The service answered 401: missing or invalid API key. Enter an API key above.")
        expect(page.get_by_label("API key")).to_be_focused()
        path, label = digit_file(tmp_path, 2)
        page.get_by_label("Choose an image file").set_input_files(path)
        expect(page.get_by_role("status")).to_have_text("The service answered 401: missing or invalid API key")

        page.get_by_label("API key").fill("not-the-right-key-at-all")
        with page.expect_response("**/predict?*") as refused:
            page.get_by_role("button", name="Use key").click()
        assert refused.value.status == 401
        assert refused.value.request.headers["authorization"] == "Bearer not-the-right-key-at-all"
        expect(page.get_by_role("status")).to_have_text("The service answered 401: missing or invalid API key")
        expect(page.locator("#key-form")).to_be_visible()
        page.get_by_label("API key").fill(key)
        with page.expect_request("**/predict?*") as sent:
            page.keyboard.press("Enter")  # submits the form; the card loads and the image is sent again
        assert sent.value.headers["authorization"] == f"Bearer {key}"
        expect(page.locator("#card-arch")).to_have_text("resnet20")
        expect(page.get_by_role("status")).to_contain_text(f"{path.name}: {label} (")
        expect(page.locator("#key-form")).to_be_hidden()
    finally:
        page.context.close()
    log.check(server)
