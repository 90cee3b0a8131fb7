"""API keys, hot model reload (admin endpoint and SIGHUP) with no failed requests, slow bodies."""

from __future__ import annotations

import gc
import shutil
import signal
import socket
import threading
import time
import weakref

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from bench.harness import wait_ready
from service.app import create_app
from service.settings import Settings
from tests.conftest import renamed_model
from tests.images import encode, one_per_class

KEY, OTHER_KEY = "k" * 20, "second-key-0123456789"
PNG = encode(one_per_class()[3][0], "PNG")


@pytest.fixture
def keyed_client(default_model):
    with TestClient(create_app(Settings(model_path=default_model, api_keys=[KEY, OTHER_KEY]))) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="no-header"),
        pytest.param({"authorization": "Bearer wrong-key-0123456789"}, 401, id="wrong-key"),
        pytest.param({"authorization": f"Basic {KEY}"}, 401, id="wrong-scheme"),
        pytest.param({"authorization": f"Bearer {KEY[:-1]}"}, 401, id="prefix-of-key"),
        pytest.param({"authorization": f"Bearer {KEY}"}, 200, id="first-key"),
        pytest.param({"authorization": f"bearer {OTHER_KEY}"}, 200, id="second-key-any-case-scheme"),
    ],
)
def test_predict_with_api_keys_requires_bearer(keyed_client, headers, status):
    r = keyed_client.post("/predict", content=PNG, headers={"content-type": "image/png", **headers})
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json() == {"detail": "missing or invalid API key"}
        assert r.headers["www-authenticate"] == "Bearer"
    m = keyed_client.get("/model", headers=headers)
    assert m.status_code == status, m.text


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/metrics"])
def test_health_and_metrics_stay_open_with_api_keys(keyed_client, path):
    r = keyed_client.get(path)
    assert r.status_code == 200, r.text


def test_admin_reload_without_api_keys_is_off(default_model):
    with TestClient(create_app(Settings(model_path=default_model))) as c:
        wait_ready(c)
        r = c.post("/admin/reload")
        assert r.status_code == 403, r.text
        assert r.json() == {"detail": "admin endpoints are off: set RESNET_API_KEYS to enable them"}


def test_settings_refuse_short_api_key():
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(api_keys=["short"])


def test_settings_read_comma_separated_keys(monkeypatch):
    monkeypatch.setenv("RESNET_API_KEYS", f"{KEY}, {OTHER_KEY}")
    assert [k.get_secret_value() for k in Settings().api_keys] == [KEY, OTHER_KEY]


class Load:
    """Requests in a loop on another thread, recording every version that answered and every failure."""

    def __init__(self, post) -> None:
        self.post, self.versions, self.failures, self.count = post, [], [], 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                r = self.post()
                if r.status_code != 200:
                    self.failures.append(r.text)
                else:
                    self.versions.append(r.json()["model"]["version"])
            except Exception as e:  # noqa: BLE001 - a transport failure is a lost request: record it
                self.failures.append(repr(e))
            self.count += 1

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_admin_reload_swaps_model_under_load_without_failures(tmp_path, default_model):
    path = tmp_path / "model.onnx"
    shutil.copy(default_model, path)
    settings = Settings(model_path=path, api_keys=[KEY])
    auth = {"authorization": f"Bearer {KEY}"}
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        old = c.get("/model", headers=auth).json()["version"]
        with Load(lambda: c.post("/predict", content=PNG, headers={"content-type": "image/png", **auth})) as load:
            time.sleep(0.3)
            renamed_model(default_model, path, "renamed")
            r = c.post("/admin/reload", headers=auth)
            assert r.status_code == 200, r.text
            new = r.json()["model"]["version"]
            time.sleep(0.3)
        # The file's name is only its metadata: the service's name, the one in V2 URLs, stays (issue 16, point 11).
        assert new != old and r.json()["model"]["name"] == "default"
        assert c.get("/model", headers=auth).json()["metadata"]["name"] == "renamed"
        assert load.failures == [] and load.count > 5
        assert load.versions[0] == old and load.versions[-1] == new
        assert set(load.versions) == {old, new}


def test_admin_reload_of_bad_file_keeps_old_model(tmp_path, default_model):
    path = tmp_path / "model.onnx"
    shutil.copy(default_model, path)
    auth = {"authorization": f"Bearer {KEY}"}
    with TestClient(create_app(Settings(model_path=path, api_keys=[KEY]))) as c:
        wait_ready(c)
        old = c.get("/model", headers=auth).json()["version"]
        failed_before = _metric(c, 'resnet_serve_model_loads_total{result="failed"}')
        path.write_bytes(b"definitely not onnx")
        r = c.post("/admin/reload", headers=auth)
        assert r.status_code == 409, r.text
        assert r.json() == {"detail": "reload failed; the previous model is still serving"}
        r = c.post("/predict", content=PNG, headers={"content-type": "image/png", **auth})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["version"] == old
        assert c.get("/health/ready").status_code == 200
        assert _metric(c, 'resnet_serve_model_loads_total{result="failed"}') == failed_before + 1


def _metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_sighup_reloads_model_under_load_without_failures(live_server, tmp_path, default_model):
    path = tmp_path / "model.onnx"
    shutil.copy(default_model, path)
    server = live_server(RESNET_MODEL_PATH=str(path))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        old = c.get("/model").json()["version"]
        with Load(lambda: c.post("/predict", content=PNG, headers={"content-type": "image/png"})) as load:
            time.sleep(0.3)
            renamed_model(default_model, path, "after-sighup")
            server.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (not load.versions or load.versions[-1] == old):
                time.sleep(0.05)
            time.sleep(0.2)
        assert server.proc.poll() is None, "SIGHUP must not stop the server"
        assert load.failures == []
        card = c.get("/model").json()
        assert load.versions[-1] != old and (card["name"], card["metadata"]["name"]) == ("default", "after-sighup")


def test_slow_body_cut_off_after_body_timeout(live_server):
    server = live_server(RESNET_BODY_TIMEOUT_S="1")
    started = time.monotonic()
    reply = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 10000\r\n\r\n")
        s.settimeout(0.1)
        for _ in range(100):  # one byte every 0.1 s: 10 s if the server waited for all of it
            try:
                s.sendall(b"\0")
                reply += s.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if reply:
                break
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - started < 5
    assert httpx.get(server.url + "/health/ready").status_code == 200


def test_admin_reload_while_first_load_warms_serves_new_file(tmp_path, default_model):
    """A reload asked for while the first load is still warming up (a SIGHUP reaching a worker that is starting)
    runs after it: the file as it is now is served, not the one the first load read."""
    from service.runtime import Model

    path = tmp_path / "model.onnx"
    shutil.copy(default_model, path)
    read, gate, calls = threading.Event(), threading.Event(), []

    def load(settings):
        model = Model.load(settings)
        calls.append(model.spec.metadata["name"])
        if len(calls) == 1:  # the first load has read the old file; it warms up until the gate opens
            read.set()
            gate.wait(30)
        return model

    auth = {"authorization": f"Bearer {KEY}"}
    with TestClient(create_app(Settings(model_path=path, api_keys=[KEY]), load_model=load)) as c:
        assert read.wait(30)
        renamed_model(default_model, path, "renamed")
        answer: list[httpx.Response] = []
        asker = threading.Thread(target=lambda: answer.append(c.post("/admin/reload", headers=auth)))
        asker.start()
        time.sleep(0.3)  # the reload is asked for before the first load ends
        gate.set()
        asker.join(30)
        wait_ready(c)
        assert answer and answer[0].status_code == 200, answer
        r = c.get("/model", headers=auth)
        assert r.json()["metadata"]["name"] == "renamed", r.text
        assert calls == [calls[0], "renamed"], calls


def test_admin_reload_frees_the_old_model_without_waiting_for_a_request(tmp_path, default_model):
    """Once a reload has swapped the model and the old one's last request is answered, nothing holds the old model
    (its sessions' memory): not even the batcher that ran its last batch, while no new request comes."""
    from service.runtime import Model

    path = tmp_path / "model.onnx"
    shutil.copy(default_model, path)
    loaded: list[weakref.ref] = []

    def load(settings):
        model = Model.load(settings)
        loaded.append(weakref.ref(model))
        return model

    auth = {"authorization": f"Bearer {KEY}"}
    with TestClient(create_app(Settings(model_path=path, api_keys=[KEY]), load_model=load)) as c:
        wait_ready(c)
        for _ in range(3):  # batches on the first model, and so a time per image measured on it
            r = c.post("/predict", content=PNG, headers={"content-type": "image/png", **auth})
            assert r.status_code == 200, r.text
        renamed_model(default_model, path, "renamed")
        r = c.post("/admin/reload", headers=auth)
        assert r.status_code == 200, r.text
        gc.collect()
        assert len(loaded) == 2, loaded
        old = loaded[0]()
        assert old is None, [type(r).__name__ for r in gc.get_referrers(old)]  # what still holds it
        assert loaded[1]() is not None
