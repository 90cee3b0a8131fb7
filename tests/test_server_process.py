"""The service as a real process: uploads refused while streaming, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.harness import start_service
from tests.images import encode, one_per_class
from tests.procfs import listening_inodes, socket_inodes


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
    assert reply.endswith('{"detail":"body too large: limit 100000 bytes (RESNET_MAX_UPLOAD_BYTES)"}'), reply


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


def thread_nices(pid: int) -> dict[int, int]:
    """Each thread of a process and its nice value (field 19 of /proc/PID/task/TID/stat)."""
    nices = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            nices[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[16])
        except OSError:
            continue  # the thread ended
    return nices


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread priorities are read from Linux's /proc")
@pytest.mark.parametrize(("compute_nice", "lowered_at_least"), [("6", 3), ("0", 0)])
def test_decoding_and_inference_threads_run_below_the_event_loop(live_server, compute_nice, lowered_at_least):
    """The decode thread, the inference thread and onnxruntime's pool (made on the inference thread with the
    session) run ``compute_nice`` steps below the event loop's thread; at 0 every thread shares its priority."""
    server = live_server(RESNET_WORKERS="1", RESNET_INTRA_OP_THREADS="2", RESNET_COMPUTE_NICE=compute_nice)
    noise = np.random.default_rng(0).integers(0, 256, (96, 96), dtype=np.uint8)
    big = encode(Image.fromarray(noise), "PNG")  # over INLINE_BYTES (4 kB): decoded on the decode pool
    assert len(big) > 4096
    r = httpx.post(server.url + "/predict", content=big, headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text
    nices = thread_nices(server.proc.pid)
    loop = nices.pop(server.proc.pid)  # the main thread runs the event loop
    lowered = [n for n in nices.values() if n == loop + int(compute_nice)] if lowered_at_least else []
    assert len(lowered) >= lowered_at_least, nices
    assert all(n in (loop, loop + int(compute_nice)) for n in nices.values()), nices


# A worker's process, with SIGTERM arriving where the supervisor's drain can catch a starting worker: after the
# early handler is set and before uvicorn installs its own (create_app runs in between).
SIGTERM_WHILE_STARTING = """
import os, signal, sys
from pathlib import Path
import service.__main__ as main
from service.balance import ConnectionShares
from service.settings import Settings

real_create_app = main.create_app

def create_app_then_sigterm(*args, **kwargs):
    app = real_create_app(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return app

main.create_app = create_app_then_sigterm
settings = Settings(port=int(sys.argv[1]), grpc_port=0)
shares = None
if sys.argv[2] == "supervised":
    ConnectionShares.create(Path(sys.argv[3]), 1)
    shares = ConnectionShares(Path(sys.argv[3]), 0)
main.run_server(settings, shares=shares)
"""


@pytest.mark.parametrize("kind", ["single", "supervised"])
def test_sigterm_while_starting_drains_and_exits_zero(tmp_path, kind):
    import subprocess
    import sys

    from tests.conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_STARTING, str(port), kind, str(tmp_path / "shares")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Application shutdown complete" in proc.stderr, proc.stderr[-2000:]


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


def worker_pids(supervisor_pid: int) -> set[int]:
    """The supervisor's worker processes (spawned interpreters; the resource tracker excluded)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == supervisor_pid and b"spawn_main" in cmdline:
            pids.add(int(stat.parent.name))
    return pids


def two_workers(supervisor_pid: int) -> set[int] | None:
    pids = worker_pids(supervisor_pid)
    return pids if len(pids) == 2 else None


def two_workers_listening(supervisor_pid: int, port: int) -> set[int] | None:
    """Both workers, once each has its model loaded and its socket listening: the service is ready as soon as the
    first one is, and until the second listens the kernel hands every connection to the first."""
    pids = two_workers(supervisor_pid)
    listening = listening_inodes(port)
    return pids if pids and all(socket_inodes(pid) & listening for pid in pids) else None


def wait_for(check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    return check()


def predict_fresh(url: str, png: bytes) -> httpx.Response:
    """One request on a new connection, so the kernel may hand it to any worker."""
    with httpx.Client(timeout=30) as c:
        return c.post(url + "/predict", content=png, headers={"content-type": "image/png"})


def test_worker_killed_is_replaced_while_the_others_keep_serving(tmp_path):
    server = start_service({"RESNET_WORKERS": "2", "RESNET_INTRA_OP_THREADS": "1"}, tmp_path / "server.log")
    png = encode(one_per_class()[3][0], "PNG")
    try:
        server.wait_ready()
        workers = wait_for(lambda: two_workers_listening(server.proc.pid, server.port))
        assert workers and len(workers) == 2, server.log_tail()
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)  # as the OOM killer does
        answers = []
        for _ in range(20):  # while it is gone: no request hangs, the survivor answers
            started = time.monotonic()
            try:
                answers.append(predict_fresh(server.url, png).status_code)
            except httpx.TransportError as e:
                answers.append(type(e).__name__)
            assert time.monotonic() - started < 10, answers
        assert answers.count(200) >= 10, answers
        replaced = wait_for(lambda: (p := two_workers(server.proc.pid)) and victim not in p and p)
        assert replaced and victim not in replaced, server.log_tail()
        assert "exited with -9" in server.log_tail(20_000), server.log_tail()
        wait_for(lambda: all(predict_fresh(server.url, png).status_code == 200 for _ in range(10)), 30)
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        counted = 'resnet_serve_http_requests_total{method="POST",route="/predict",status="200"}'
        served = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(counted))
        assert served >= 10, metrics[:2000]  # one exposition counts every worker's requests
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()


def test_workers_publish_the_images_they_hold_for_the_others(tmp_path):
    """RESNET_ORT_SPINNING=alone: a worker runs a batch on its spinning session only when no other worker holds an
    image, which each reads from the cells of the supervisor's activity file (service.activity)."""
    from service.activity import Activity

    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    server = start_service({"RESNET_WORKERS": "2", "RESNET_INTRA_OP_THREADS": "1",
                            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, tmp_path / "server.log")
    files = [("files", (f"{i}.png", encode(img, "PNG"), "image/png")) for i, (img, _) in enumerate(one_per_class() * 4)]
    try:
        server.wait_ready()
        assert wait_for(lambda: two_workers(server.proc.pid)), server.log_tail()
        (path,) = metrics_dir.glob("activity-*.bin")
        cells = Activity(path, 0).cells
        held, statuses = [], []
        for _ in range(20):  # until a request is caught in flight; each holds its 40 images for tens of ms
            with httpx.Client(timeout=30) as c:
                sent = threading.Thread(target=lambda c=c: statuses.append(c.post(server.url + "/predict",
                                                                                  files=files).status_code))
                sent.start()
                while sent.is_alive():
                    held.append(max(cells))
                sent.join()
            if max(held) == 40:
                break
        assert set(statuses) == {200} and max(held) == 40, (statuses, max(held), server.log_tail())
        assert wait_for(lambda: list(cells) == [0, 0], 10), list(cells)  # none held once answered
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()


def test_statistics_sum_every_workers_requests(tmp_path):
    """Triton's statistics answered by any worker count the images all of them ran (tests/test_v2_extensions.py
    checks the figures themselves)."""
    server = start_service({"RESNET_WORKERS": "2", "RESNET_INTRA_OP_THREADS": "1"}, tmp_path / "server.log")
    png = encode(one_per_class()[5][0], "PNG")
    try:
        server.wait_ready()
        assert wait_for(lambda: two_workers(server.proc.pid)), server.log_tail()
        statuses = [predict_fresh(server.url, png).status_code for _ in range(20)]  # over both workers
        assert statuses == [200] * 20, statuses
        counts = []
        for _ in range(10):  # each read on a fresh connection: either worker answers
            with httpx.Client(timeout=30) as c:
                r = c.get(server.url + "/v2/models/default/stats")
            assert r.status_code == 200, r.text
            counts.append(r.json()["model_stats"][0]["inference_count"])
        assert set(counts) == {20}, counts
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()


def test_sighup_reloads_every_worker(tmp_path, default_model):
    from bench.zero_cost import zero_cost_model

    served = tmp_path / "served.onnx"
    shutil.copy(default_model, served)
    server = start_service({"RESNET_WORKERS": "2", "RESNET_INTRA_OP_THREADS": "1", "RESNET_MODEL_PATH": str(served)},
                           tmp_path / "server.log")
    png = encode(one_per_class()[3][0], "PNG")
    try:
        server.wait_ready()
        old = {predict_fresh(server.url, png).headers["x-model-version"] for _ in range(10)}
        assert len(old) == 1, old
        zero_cost_model(default_model, tmp_path / "zero.onnx")
        os.replace(tmp_path / "zero.onnx", served)
        os.kill(server.proc.pid, signal.SIGHUP)
        def new_versions() -> set[str] | None:
            versions = {predict_fresh(server.url, png).headers["x-model-version"] for _ in range(16)}
            return None if versions & old else versions

        versions = wait_for(new_versions, 60)
        told = [line for line in server.log_tail(200_000).splitlines() if "POST /predict" not in line][-40:]
        assert versions and not versions & old, (old, versions, told)  # the log, less its access lines
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()


def exchange(port: int, parts: list[bytes]) -> bytes:
    """Send ``parts`` one by one (the server may answer and close before the last); the reply, whole."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            for part in parts:
                s.sendall(part)
                time.sleep(0.01)  # separate reads, so a head drip-fed over many packets is counted across them
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    return reply


PNG = encode(one_per_class()[7][0], "PNG")
HEAD_LIMIT = 4096


def post(headers: bytes = b"", target: bytes = b"/predict", body: bytes = PNG) -> bytes:
    return (b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nConnection: close\r\n" + headers
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


@pytest.mark.parametrize(
    ("parts", "status"),
    [
        pytest.param([post(b"X-Big: " + b"a" * 100_000 + b"\r\n")], 431, id="one-100kB-header"),
        pytest.param([post(b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 60) for i in range(100)))], 431,
                     id="many-headers-over-the-limit"),
        pytest.param([post(target=b"/predict?" + b"q" * 5000)], 431, id="long-request-line"),
        pytest.param([b"GET /health/live HTTP/1.1\r\nHost: x\r\n"] + [b"X-Drip: %s\r\n" % (b"d" * 90)] * 80, 431,
                     id="head-drip-fed-never-ending"),
        pytest.param([post(b"X-Fine: " + b"c" * 3000 + b"\r\n")], 200, id="under-the-limit"),
        pytest.param([post(body=PNG + b"\0" * 200_000)], 200, id="large-body-in-the-same-packets"),
    ],
)
def test_request_head_over_limit_answered_431(live_server, parts, status):
    server = live_server(RESNET_MAX_HEADER_BYTES=str(HEAD_LIMIT))
    reply = exchange(server.port, parts)
    assert reply.startswith(b"HTTP/1.1 %d" % status), reply[:300]
    if status == 431:
        assert reply.endswith(b'{"detail":"request line and headers too large: limit 4096 bytes '
                              b'(RESNET_MAX_HEADER_BYTES)"}'), reply[:300]
    r = httpx.post(f"{server.url}/predict", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text  # and the service keeps serving
