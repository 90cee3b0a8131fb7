"""The service as a real process: uploads refused while streaming, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx

from bench.harness import start_service
from tests.images import encode, one_per_class


def test_upload_with_huge_content_length_refused_before_body(live_server):
    server = live_server(RESNET_MAX_UPLOAD_BYTES="100000")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000000\r\n\r\n")
        reply = ""
        while not reply.endswith("}"):
            part = s.recv(4096).decode()
            if not part:
                break
            reply += part
    assert reply.startswith("HTTP/1.1 413"), reply
    assert reply.endswith('{"detail":"body too large"}'), reply


def test_chunked_upload_cut_off_near_limit(live_server):
    server = live_server(RESNET_MAX_UPLOAD_BYTES="100000")
    sent = 0
    reply = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
        s.settimeout(0.05)
        chunk = b"10000\r\n" + b"\0" * 0x10000 + b"\r\n"
        try:
            for _ in range(1000):  # up to 64 MB if the server kept reading
                s.sendall(chunk)
                sent += 0x10000
                try:
                    reply += s.recv(4096)
                except TimeoutError:
                    continue
                if reply:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert b"413" in reply.split(b"\r\n")[0], reply[:200]
    assert sent < 4_000_000, sent  # refused near the 100 kB limit, not after buffering the whole upload


def test_sigterm_drains_accepted_requests_then_exits_zero(live_server):
    # Batches of one at a slow pace, so requests are still in flight when SIGTERM arrives.
    server = live_server(RESNET_MAX_BATCH_SIZE="1", RESNET_INTRA_OP_THREADS="1", RESNET_DRAIN_TIMEOUT_S="30")
    img, label = one_per_class()[6]
    big = encode(img.resize((1200, 1200)).convert("RGB"), "PNG")  # PNG: no draft mode, so decoding takes time
    results: list[httpx.Response | Exception] = []
    started = threading.Barrier(17)

    def call() -> None:
        with httpx.Client(timeout=60) as c:
            started.wait()
            try:
                results.append(c.post(server.url + "/predict", content=big, headers={"content-type": "image/png"}))
            except Exception as e:  # noqa: BLE001 - recorded and asserted on below
                results.append(e)

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    with httpx.Client(timeout=5) as probe:
        assert probe.get(server.url + "/health/ready").status_code == 200
        started.wait()
        time.sleep(0.3)  # let the requests be accepted
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        try:
            ready = probe.get(server.url + "/health/ready")  # the kept-alive connection still gets an answer
            assert ready.status_code == 503, ready.text
            assert ready.json()["status"] == "draining"
        except httpx.TransportError:
            pass  # or the connection was already closed: either way the orchestrator sees not-ready
    for t in threads:
        t.join(60)
    assert server.proc.wait(30) == 0, server.log_tail()
    assert len(results) == 16
    failures = [r for r in results if not isinstance(r, httpx.Response) or r.status_code != 200]
    assert not failures, failures
    assert all(r.json()["predictions"][0]["top_k"][0]["label"] == str(label) for r in results)


def test_workers_accept_connections_only_once_their_model_is_ready(tmp_path):
    """With several workers, readiness answered by one worker must hold for all: the kernel hands each new
    connection to any of them, so none may accept while still loading (it would answer 503)."""
    server = start_service({"RESNET_WORKERS": "2", "RESNET_MAX_BATCH_SIZE": "64"}, tmp_path / "server.log")
    try:
        seen, first_ready = [], None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (first_ready is None or time.monotonic() < first_ready + 3):
            try:  # a fresh connection each time, so each may land on either worker
                status = httpx.get(server.url + "/health/ready", timeout=30).status_code
            except httpx.TransportError:
                continue  # not listening yet
            seen.append(status)
            if status == 200 and first_ready is None:
                first_ready = time.monotonic()
        assert first_ready is not None, server.log_tail()
        after = seen[seen.index(200):]
        assert set(after) == {200}, f"{after.count(503)} of {len(after)} answers after the first ready were 503"
    finally:
        server.stop()
