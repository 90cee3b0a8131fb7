"""The one harness that starts servers for the tests, the benchmark and the soak: ready, failure with the log,
stop with the exit code. Tiny stand-in servers (the standard library's), so no model is loaded."""

from __future__ import annotations

import sys
import time

import pytest

from bench.harness import Server, ServerFailed, free_port, serve

# Answers 200 on every GET; exits 0 on SIGTERM (Python's default handler would exit -15).
READY_SERVER = """
import http.server, signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
print("listening", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def python(code: str, port: int) -> list[str]:
    return [sys.executable, "-c", code, str(port)]


def test_serve_waits_until_ready_then_stop_returns_exit_code(tmp_path):
    port = free_port()
    server = Server(python(READY_SERVER, port), tmp_path / "s.log", port=port)
    with serve(server, timeout=30) as ready:
        assert ready.proc.poll() is None
    assert server.proc.returncode == 0, server.log_tail()
    assert "listening" in (tmp_path / "s.log").read_text()


def test_wait_ready_fails_at_once_with_log_when_process_exits(tmp_path):
    port = free_port()
    server = Server(python("import sys; print('bad model file', flush=True); sys.exit(3)", port), tmp_path / "s.log",
                    port=port)
    started = time.monotonic()
    with pytest.raises(ServerFailed, match=r"(?s)server exited 3.*bad model file"):
        server.wait_ready(timeout=60)
    assert time.monotonic() - started < 30  # the exit is noticed, not waited out to the timeout
    assert server.stop() == 3


def test_wait_ready_times_out_with_log_when_nothing_listens(tmp_path):
    port = free_port()
    server = Server(python("import time; print('still loading', flush=True); time.sleep(60)", port),
                    tmp_path / "s.log", port=port)
    try:
        with pytest.raises(ServerFailed, match=r"(?s)not ready within 1 s.*still loading"):
            server.wait_ready(timeout=1)
    finally:
        server.stop()


def test_stop_kills_process_that_ignores_sigterm(tmp_path):
    port = free_port()
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    server = Server(python(code, port), tmp_path / "s.log", port=port)
    deadline = time.monotonic() + 30
    while "up" not in (tmp_path / "s.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGTERM before the handler is installed would end it the ordinary way
    assert server.stop(timeout=0.5) == -9


def test_log_tail_shows_only_this_servers_part_of_a_shared_log(tmp_path):
    log = tmp_path / "shared.log"
    log.write_text("an earlier server's line\n")
    port = free_port()
    server = Server(python("import sys; print('mine', flush=True); sys.exit(1)", port), log, port=port)
    server.proc.wait(30)
    assert server.log_tail() == "mine\n"
    assert server.stop() == 1
