"""A new user's first hour with the service (issue 16, points 9-15), each as the README has them do it: the
sample images, `make run` with its settings, the model's name, /docs offline, /metrics, the access log."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from bench.harness import Server, free_port, wait_ready
from service import access_log
from service.app import create_app
from service.settings import Settings
from tests.conftest import ROOT, renamed_model
from tests.images import validation_digits

SAMPLES = ROOT / "samples"
# The committed samples: validation digits of the default model (tests/images.py renders them as it was trained).
SAMPLE_DIGITS = {"digit-7.png": (13, "7"), "digit-3.jpg": (8, "3")}  # file -> (validation index, label)


# --- point 9: samples the README's examples send ---------------------------------------------------------------


def test_samples_are_validation_digits_the_default_model_reads_right(default_model):
    images, labels = validation_digits()
    for name, (index, label) in SAMPLE_DIGITS.items():
        assert str(labels[index]) == label, name
        committed = np.asarray(Image.open(SAMPLES / name), dtype=np.int16)
        tolerance = 0 if name.endswith(".png") else 24  # the PNG is the rendering itself; the JPEG near it
        assert np.abs(committed - np.asarray(images[index], dtype=np.int16)).max() <= tolerance, name
    files = [("files", (name, (SAMPLES / name).read_bytes())) for name in SAMPLE_DIGITS]
    with TestClient(create_app(Settings(model_path=default_model))) as c:
        wait_ready(c)
        r = c.post("/predict", files=files)
    assert r.status_code == 200, r.text
    top = [p["top_k"][0] for p in r.json()["predictions"]]
    assert [t["label"] for t in top] == [label for _, label in SAMPLE_DIGITS.values()], r.text
    assert min(t["probability"] for t in top) > 0.99, r.text


@pytest.mark.parametrize("doc", ["README.md", "docs/open-inference-protocol.md"])
def test_examples_send_files_the_repository_has(doc):
    text = (ROOT / doc).read_text()
    sent = re.findall(r"@([\w./-]+\.(?:png|jpe?g))", text) + re.findall(r"open\(\"([^\"]+)\", \"rb\"\)", text)
    sent += re.findall(r"base64 -w0 ([\w./-]+)", text)
    assert sent, f"{doc} has no example that sends an image"
    missing = [path for path in sent if not (ROOT / path).is_file()]
    assert not missing, f"{doc} sends files a fresh clone does not have: {missing}"


# --- point 10: make run takes its settings from the environment ------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_binds_port_from_environment_and_logs_each_request(tmp_path):
    venv = tmp_path / "venv"  # a stand-in for .venv/: this interpreter, its install stamp fresh
    venv.mkdir()
    (venv / ".serve").touch()
    port = free_port()
    server = Server(["make", "-s", "-C", str(ROOT), "run", f"VENV={venv}", f"PY={sys.executable}"],
                    tmp_path / "make.log", port=port, env={"RESNET_PORT": str(port), "RESNET_HOST": "127.0.0.1"})
    try:
        server.wait_ready()
        r = httpx.get(server.url + "/health/live", timeout=10)
        assert r.status_code == 200, r.text
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGTERM)  # make and the service it started: the service drains
        server.stop()
    assert re.search(r"service\.access: \S+ GET /health/live 200 [\d.]+ms", server.log_tail(20_000)), \
        server.log_tail()


# --- point 11: the model's name is the deployment's, not the file's --------------------------------------------


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        pytest.param({}, "default", id="default-whatever-the-file-says"),
        pytest.param({"model_name": "digits"}, "digits", id="RESNET_MODEL_NAME"),
    ],
)
def test_model_name_is_the_setting_not_the_file(tmp_path, default_model, settings, name):
    path = tmp_path / "mine.onnx"
    renamed_model(default_model, path, "mine")  # as `--export models/mine.onnx` records it
    with TestClient(create_app(Settings(model_path=path, **settings))) as c:
        wait_ready(c)
        r = c.get(f"/v2/models/{name}/ready")
        assert r.status_code == 200 and r.json() == {"name": name, "ready": True}, r.text
        r = c.post("/predict", content=(SAMPLES / "digit-7.png").read_bytes(), headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["model"]["name"] == name, r.text
        card = c.get("/model").json()
        assert (card["name"], card["metadata"]["name"]) == (name, "mine"), card
        assert c.get("/v2/models/mine/ready").status_code == 404


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("a/b", id="slash-breaks-the-url"),
        pytest.param("my model", id="space"),
        pytest.param("-x", id="leading-dash"),
        pytest.param("x" * 65, id="too-long"),
    ],
)
def test_model_name_refused_unless_url_safe(name):
    with pytest.raises(ValidationError, match="model_name"):
        Settings(model_name=name)


# --- point 14: /metrics conventions ----------------------------------------------------------------------------

# prometheus-client's own process and runtime collectors keep their standard names, as in every exporter.
STANDARD = ("process_", "python_")


def test_metrics_prefixed_without_created_series_and_docs_labelled_by_route(default_model):
    with TestClient(create_app(Settings(model_path=default_model))) as c:
        wait_ready(c)
        for path in ("/docs", "/openapi.json", "/docs/assets/swagger-ui.css"):
            assert c.get(path).status_code == 200, path
        c.post("/predict", content=(SAMPLES / "digit-7.png").read_bytes(), headers={"content-type": "image/png"})
        text = c.get("/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    ours = {n for n in names if not n.startswith(STANDARD)}
    assert ours and all(n.startswith("resnet_serve_") for n in ours), sorted(ours)
    assert "resnet_serve_model_info" in ours and "resnet_serve_model_loads_total" in ours, sorted(ours)
    assert not [n for n in names if n.endswith("_created")], sorted(names)
    for route in ("/docs", "/openapi.json", "/docs/assets", "/predict"):
        assert f'route="{route}",status="200"' in text, route
    assert 'route="unmatched",status="200"' not in text, text


# --- point 15: an access log, on unless switched off -----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "logged"),
    [
        pytest.param({}, True, id="on-by-default"),
        pytest.param({"RESNET_LOG_LEVEL": "warning"}, True, id="on-at-a-quieter-log-level"),
        pytest.param({"RESNET_ACCESS_LOG": "false"}, False, id="off-by-setting"),
    ],
)
def test_access_log_one_line_per_request(live_server, env, logged):
    server = live_server(**env)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        r = c.post("/predict?top_k=1", content=(SAMPLES / "digit-7.png").read_bytes(),
                   headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        assert c.get("/nowhere").status_code == 404
    want = [("POST", "/predict", 200), ("GET", "/nowhere", 404)] if logged else []
    deadline = time.monotonic() + 5  # a line is written once its response is sent: it may trail the answer
    while True:
        lines = re.findall(r"service\.access: (\S+) (\S+) (\S+) (\d+) ([\d.]+)ms$", server.log_tail(20_000), re.M)
        requests = [(method, path, int(status)) for _, method, path, status, _ in lines if path != "/health/ready"]
        if requests == want or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert requests == want, server.log_tail()
    uvicorn_lines = [line for line in server.log_tail(20_000).splitlines() if "uvicorn.access" in line]
    assert not uvicorn_lines, uvicorn_lines  # one access log, not two


def test_access_log_setting_read_from_environment(monkeypatch):
    monkeypatch.delenv("RESNET_ACCESS_LOG", raising=False)
    assert Settings().access_log is True
    monkeypatch.setenv("RESNET_ACCESS_LOG", "false")
    assert Settings().access_log is False


class Stuck(logging.Handler):
    """A terminal or pipe that stops reading: every write waits until ``unblocked`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(logging.Filter("service.access"))
        self.unblocked, self.lines = threading.Event(), []

    def emit(self, record: logging.LogRecord) -> None:
        self.unblocked.wait(30)
        self.lines.append(record.getMessage())


def test_access_log_written_off_the_event_loop_when_output_blocks(default_model):
    stuck = Stuck()
    root = logging.getLogger()
    root.addHandler(stuck)
    writer = access_log.BackgroundWriter().start()
    level = access_log.log.level
    access_log.log.setLevel(logging.INFO)
    try:
        with TestClient(create_app(Settings(model_path=default_model, grpc_port=0))) as client:
            wait_ready(client)
            body = (SAMPLES / "digit-7.png").read_bytes()
            # Written on the event loop, the first line would hold every later request until the output drains.
            codes = [client.post("/predict", content=body, headers={"content-type": "image/png"}).status_code
                     for _ in range(5)]
            assert codes == [200] * 5, codes
            assert stuck.lines == [], stuck.lines
    finally:
        stuck.unblocked.set()
        writer.stop()
        root.removeHandler(stuck)
        access_log.log.setLevel(level)
    logged = [line for line in stuck.lines if "POST /predict 200" in line]
    assert len(logged) == 5, stuck.lines  # nothing lost: the queue is written out at stop
