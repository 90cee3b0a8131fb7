"""How the HTTP server writes a response (``service.server.OneWrite``): a small answer's head and body in one write,
a head with no body yet not held back, and 100 Continue ahead of both. A real uvicorn server with the service's
protocol; each connection's transport is wrapped to record the writes that reach it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from service.server import capped_head

PAUSE_S = 0.5  # the app's wait between a response's start and its (next) body part


class Recording:
    """The connection's real transport, with every write that reaches it recorded (bytes, per call)."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport, self._writes = transport, writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def writelines(self, parts) -> None:  # noqa: ANN001
        parts = list(parts)
        self._writes.append(b"".join(parts))
        self._transport.writelines(parts)

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the transport's own
        return getattr(self._transport, name)


async def app(scope, receive, send) -> None:  # noqa: ANN001
    """/small: one body; /stream: a part, a pause, the last part; /late: a pause between the start and the body."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")] + ([] if scope["path"] == "/stream" else
                                                                  [(b"content-length", b"5")])})
    if scope["path"] == "/stream":
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await asyncio.sleep(PAUSE_S)
        await send({"type": "http.response.body", "body": b"last"})
        return
    if scope["path"] == "/late":
        await asyncio.sleep(PAUSE_S)
    await send({"type": "http.response.body", "body": b"hello"})


@pytest.fixture
def server():
    """(port, the writes recorded) of a uvicorn server running ``app`` with the service's protocol."""
    writes: list[bytes] = []
    base = capped_head(16 * 1024)

    class Recorded(base):
        def connection_made(self, transport) -> None:  # noqa: ANN001
            super().connection_made(Recording(transport, writes))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=Recorded, loop="uvloop",
                                        log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.started, "the server did not start"
    yield port, writes
    srv.should_exit = True
    thread.join(30)


def request(method: str, path: str, extra: str = "", body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n{extra}\r\n").encode() + body


def read_until(sock: socket.socket, ending: bytes, timeout_s: float) -> tuple[bytes, float]:
    """What arrives until it ends with ``ending``, and the seconds it took."""
    start, data = time.monotonic(), b""
    sock.settimeout(timeout_s)
    while not data.endswith(ending):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data, time.monotonic() - start


@pytest.mark.parametrize(("method", "path", "ending"), [
    pytest.param("POST", "/small", b"hello", id="head-and-body"),
    pytest.param("HEAD", "/small", b"\r\n\r\n", id="head-alone-at-the-end-of-the-turn"),
    pytest.param("GET", "/stream", b"first\r\n", id="stream-head-with-its-first-part"),
])
def test_response_leaves_with_its_head_in_one_write(server, method, path, ending):
    """Everything the client has read so far reached the connection in a single write."""
    port, recorded = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request(method, path))
        data, _ = read_until(sock, ending, timeout_s=10)
        assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data
        assert recorded == [data], recorded  # a stream's last part comes PAUSE_S later


def test_head_is_not_held_while_the_body_is_late(server):
    """The head leaves at the end of the loop's turn, not with a body that comes PAUSE_S later."""
    port, recorded = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request("GET", "/late"))
        head, waited = read_until(sock, b"\r\n\r\n", timeout_s=10)
        body, _ = read_until(sock, b"hello", timeout_s=10)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and waited < PAUSE_S / 2, (head, waited)
    assert body == b"hello", body
    assert recorded == [head, b"hello"], recorded


def test_continue_is_written_before_the_head_and_alone(server):
    """A client that waits for 100 Continue gets it at once; the answer's head and body then leave together."""
    port, recorded = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request("POST", "/small", "expect: 100-continue\r\ncontent-type: text/plain\r\n")
                     .replace(b"content-length: 0", b"content-length: 4"))
        interim, _ = read_until(sock, b"\r\n\r\n", timeout_s=10)
        sock.sendall(b"body")
        answer, _ = read_until(sock, b"hello", timeout_s=10)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert recorded == [interim, answer], recorded
