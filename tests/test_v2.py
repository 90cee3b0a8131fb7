"""The Open Inference Protocol (KServe V2): Triton's own HTTP client against the service as a real process,
results held to /predict's, and every malformed request answered 4xx {"error"} while the service keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import LiveServer

LIMITS = {"max_upload_bytes": 200_000, "max_batch_images": 16, "max_batch_size": 8}


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
