"""The Open Inference Protocol (KServe V2): Triton's own HTTP client against the service as a real process,
results held to /predict's, and every malformed request answered 4xx {"error"} while the service keeps serving."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient

from service.app import create_app
from service.runtime import Model, ModelSpec
from service.settings import Settings
from tests.conftest import LiveServer

LIMITS = {"max_upload_bytes": 200_000, "max_batch_images": 16, "max_batch_size": 8}
KEY = "v2-test-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    """One ``python -m service`` for the module (the ``live_server`` fixture starts one per test)."""
    env = {f"RESNET_{k.upper()}": str(v) for k, v in LIMITS.items()}
    s = LiveServer(env, tmp_path_factory.mktemp("v2") / "server.log")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def client(server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def spec(default_model) -> ModelSpec:
    return Model.load(Settings(model_path=default_model)).spec


# --- health and metadata, through tritonclient ----------------------------------------------------------------------


def test_server_health_and_metadata_via_tritonclient(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata() == {"name": "resnet-serve", "version": "0.1.0", "extensions": []}


@pytest.mark.parametrize(
    ("name", "version", "ready"),
    [
        pytest.param("default", "", True, id="served"),
        pytest.param("default", "served-version", True, id="served-version"),
        pytest.param("resnet", "", False, id="unknown-model"),
        pytest.param("default", "1", False, id="unknown-version"),
    ],
)
def test_model_ready_via_tritonclient(client, spec, name, version, ready):
    version = spec.version if version == "served-version" else version
    assert client.is_model_ready(name, version) is ready


@pytest.mark.parametrize("versioned", [pytest.param(False, id="unversioned"), pytest.param(True, id="versioned")])
def test_model_metadata_via_tritonclient(client, spec, versioned):
    meta = client.get_model_metadata("default", spec.version if versioned else "")
    assert meta == {
        "name": "default", "versions": [spec.version], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }


# --- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "request_kwargs", "status", "error"),
    [
        pytest.param("GET", "/v2/models/resnet", {}, 404, "unknown model 'resnet'", id="unknown-model-metadata"),
        pytest.param("GET", "/v2/models/default/versions/1", {}, 404, "unknown version '1' of model 'default'",
                     id="unknown-version-metadata"),
        pytest.param("GET", "/v2/models/default/stats", {}, 404, "Not Found", id="unknown-path"),
    ],
)
def test_bad_request_gets_v2_error_and_service_keeps_serving(http, method, path, request_kwargs, status, error):
    r = http.request(method, path, **request_kwargs)
    assert r.status_code == status, r.text
    assert r.json() == {"error": error}
    ok = http.get("/v2/models/default/ready")
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/v2/nothing", {"error": "Not Found"}, id="v2"),
        pytest.param("/nothing", {"detail": "Not Found"}, id="elsewhere"),
        pytest.param("/v2nothing", {"detail": "Not Found"}, id="v2-prefix-only"),
    ],
)
def test_unknown_path_error_shape_follows_protocol(http, path, body):
    r = http.get(path)
    assert r.status_code == 404, r.text
    assert r.json() == body


# --- server states, in process --------------------------------------------------------------------------------------


def serve(default_model, load_model=Model.load, **settings) -> TestClient:
    app = create_app(Settings(model_path=default_model, **LIMITS, **settings), load_model=load_model)
    return TestClient(app, raise_server_exceptions=False)


def wait_ready(c: TestClient) -> None:
    deadline = time.monotonic() + 30
    while c.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "service did not become ready"
        time.sleep(0.02)


class TestBeforeReady:
    def test_v2_ready_503_live_200_while_loading(self, default_model):
        gate = threading.Event()

        def slow_load(s: Settings) -> Model:
            gate.wait(30)
            return Model.load(s)

        with serve(default_model, load_model=slow_load) as c:
            r = c.get("/v2/health/live")
            assert r.status_code == 200 and r.json() == {"live": True}, r.text
            r = c.get("/v2/health/ready")
            assert r.status_code == 503 and r.json() == {"ready": False}, r.text
            for path in ("/v2/models/default/ready", "/v2/models/default"):
                r = c.get(path)
                assert r.status_code == 503 and r.json() == {"error": "model not ready"}, r.text
            gate.set()
            wait_ready(c)
            r = c.get("/v2/models/default/ready")
            assert r.status_code == 200 and r.json() == {"name": "default", "ready": True}, r.text


@pytest.fixture(scope="module")
def keyed(default_model) -> Iterator[TestClient]:
    with serve(default_model, api_keys=[KEY]) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize(
    ("method", "path", "request_kwargs", "without_key", "with_key"),
    [
        pytest.param("GET", "/v2/health/live", {}, 200, 200, id="live-open"),
        pytest.param("GET", "/v2/health/ready", {}, 200, 200, id="ready-open"),
        pytest.param("GET", "/v2", {}, 401, 200, id="server-metadata"),
        pytest.param("GET", "/v2/models/default", {}, 401, 200, id="model-metadata"),
        pytest.param("GET", "/v2/models/default/ready", {}, 401, 200, id="model-ready"),
        pytest.param("GET", "/v2/models/resnet", {}, 401, 404, id="unknown-model-hidden-without-key"),
    ],
)
def test_v2_with_api_keys_requires_bearer_except_health(keyed, method, path, request_kwargs, without_key, with_key):
    r = keyed.request(method, path, **request_kwargs)
    assert r.status_code == without_key, r.text
    if without_key == 401:
        assert r.json() == {"error": "missing or invalid API key"}
        assert r.headers["www-authenticate"] == "Bearer"
    r = keyed.request(method, path, **request_kwargs, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == with_key, r.text
