"""Clients that go away mid-request leave nothing behind: no image held in the batcher's queue, no
asyncio task, no open file descriptor, no 5xx counted against the service; the next request is served
at once. The app runs under uvicorn in a thread of this process, so the test can see its event loop."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import time
from collections.abc import Callable

import httpx
import pytest

from bench.harness import ThreadedServer
from service.app import create_app
from service.settings import Settings
from tests.images import encode, one_per_class

ROUNDS = 40
SETTLE_S = 5.0


def loop_tasks(server: ThreadedServer) -> list[str]:
    """Names of the tasks alive on the server's event loop (besides the one asking)."""

    async def names() -> list[str]:
        me = asyncio.current_task()
        return sorted(t.get_name() for t in asyncio.all_tasks() if t is not me)

    return asyncio.run_coroutine_threadsafe(names(), server.loop).result(5)


def queue_depth(server: ThreadedServer) -> int:
    return server.app.state.service.batcher.depth


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def status_count(metrics: str, status: str) -> float:
    return sum(float(v) for v in re.findall(
        rf'^resnet_serve_http_requests_total{{method="POST",route="/predict",status="{status}"}} (\S+)$', metrics,
        re.M))


# --- ways to leave --------------------------------------------------------------------------------

BIG_PNG = encode(one_per_class()[6][0].resize((1200, 1200)).convert("RGB"), "PNG")  # tens of ms to decode


def head(length: int | None, ctype: str = "image/png", chunked: bool = False) -> bytes:
    lines = ["POST /predict HTTP/1.1", "Host: x", f"Content-Type: {ctype}"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def multipart_half() -> bytes:
    part = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + BIG_PNG + b"\r\n--b--\r\n")
    return head(len(part), "multipart/form-data; boundary=b") + part[: len(part) // 2]


def reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST, not FIN


# (what the client sends, what it does to the socket before closing it, whether the service can
# notice the departure: with pipelined requests uvicorn stops reading the socket while it answers the
# first, so it learns of the close only when it writes that answer)
LEAVERS: list = [
    pytest.param(lambda: head(len(BIG_PNG)), None, True, id="headers-only"),
    pytest.param(lambda: head(len(BIG_PNG)) + BIG_PNG[: len(BIG_PNG) // 2], None, True, id="half-the-body"),
    pytest.param(lambda: head(len(BIG_PNG)) + BIG_PNG, None, True, id="whole-body-in-flight"),
    pytest.param(lambda: head(len(BIG_PNG)) + BIG_PNG, reset, True, id="whole-body-then-rst"),
    pytest.param(multipart_half, None, True, id="half-a-multipart-body"),
    pytest.param(lambda: head(None, chunked=True) + b"1000\r\n" + BIG_PNG[:4096] + b"\r\n", None, True,
                 id="unterminated-chunked"),
    pytest.param(lambda: (head(len(BIG_PNG)) + BIG_PNG) * 3, None, False, id="three-pipelined"),
]


@pytest.fixture(scope="module")
def server(default_model):
    s = ThreadedServer(create_app(Settings(model_path=default_model, max_batch_size=4)))
    yield s.wait_ready()
    s.stop()


@pytest.mark.parametrize(("payload", "before_close", "noticed"), LEAVERS)
def test_predict_client_leaving_mid_request_leaves_nothing_behind(
    server: ThreadedServer, payload: Callable[[], bytes], before_close: Callable[[socket.socket], None] | None,
    noticed: bool,
):
    img, label = one_per_class()[3]
    with httpx.Client(base_url=server.url, timeout=10) as c:
        started = time.perf_counter()
        assert c.post("/predict", content=encode(img, "PNG"), headers={"content-type": "image/png"}).status_code == 200
        before = time.perf_counter() - started
        baseline_metrics = c.get("/metrics").text
    baseline_tasks, baseline_fds = loop_tasks(server), open_fds()
    data = payload()
    for _ in range(ROUNDS):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(data)
        if before_close is not None:
            before_close(s)
        s.close()

    deadline = time.monotonic() + SETTLE_S  # in-flight decodes finish on their own threads first
    while time.monotonic() < deadline and (queue_depth(server) or loop_tasks(server) != baseline_tasks):
        time.sleep(0.05)
    assert queue_depth(server) == 0
    assert loop_tasks(server) == baseline_tasks, (baseline_tasks, loop_tasks(server))
    assert open_fds() <= baseline_fds, (baseline_fds, open_fds())
    with httpx.Client(base_url=server.url, timeout=10) as c:
        metrics = c.get("/metrics").text
        started = time.perf_counter()
        r = c.post("/predict", content=encode(img, "PNG"), headers={"content-type": "image/png"})
        elapsed = time.perf_counter() - started
    assert re.search(r"^resnet_serve_predict_queue_depth 0\.0$", metrics, re.M), metrics
    for status in ("500", "503", "504"):  # a client leaving is not the service failing
        assert status_count(metrics, status) == status_count(baseline_metrics, status), status
    if noticed:  # the departure was seen mid-request (499), so the abandonment path itself ran
        assert status_count(metrics, "499") > status_count(baseline_metrics, "499")
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["top_k"][0]["label"] == str(label), r.text
    assert elapsed < max(1.0, 20 * before), (elapsed, before)  # a ratio, floored: the machine is shared
