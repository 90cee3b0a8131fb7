"""One way to run a server, for the tests, the benchmark and the soak alike: a free port, a process started with
its output in a log file, a wait until a URL answers ready (failing at once if the process exits), and a stop
(SIGTERM, then kill after a timeout) that returns the exit code. Failures carry the server's own log.

Imports neither torch nor onnxruntime, so torch-free test runs and the bench's client side can use it.

    with serve_service({"RESNET_MAX_BATCH_SIZE": "8"}, log) as server:
        httpx.post(server.url + "/predict", ...)
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
READY_PATH = "/health/ready"


class ServerFailed(RuntimeError):
    """The server exited, or did not become ready in time; the message holds the reason and its log's tail."""


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the kernel's pick; another process may still take it before we bind)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(server: str | httpx.Client, path: str = READY_PATH, *, timeout: float = 60.0,
               exited: Callable[[], str | None] = lambda: None, poll_s: float = 0.05) -> None:
    """Until ``GET path`` answers 200, on a base URL or on a client (a ``TestClient`` included).

    ``exited`` returns why the server is gone (None while it runs), so a crashed server fails in one poll
    rather than at the timeout; a server whose readiness says ``"status": "failed"`` fails at once too.
    """
    client = server if isinstance(server, httpx.Client) else httpx.Client(base_url=server, timeout=2)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reason = exited()
            if reason is not None:
                raise ServerFailed(reason)
            try:
                r = client.get(path)
            except httpx.TransportError:
                r = None  # not listening yet
            if r is not None and r.status_code == 200:
                return
            if r is not None and '"status":"failed"' in r.text.replace(" ", ""):
                raise ServerFailed(f"server reports it failed: {r.text}")
            time.sleep(poll_s)
        raise ServerFailed(f"not ready within {timeout:.0f} s (GET {path})")
    finally:
        if client is not server:
            client.close()


class Server:
    """A server process on ``url``, its stdout and stderr appended to ``log_path``."""

    def __init__(self, argv: Sequence[str], log_path: Path, *, port: int, env: Mapping[str, str] | None = None,
                 cwd: Path = ROOT, host: str = HOST) -> None:
        self.port, self.url, self.log_path = port, f"http://{host}:{port}", Path(log_path)
        self._log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        self._log_start = self._log.tell()  # a log shared by several servers: show only this one's part
        # Its own process group, so a kill after the SIGTERM timeout also reaches the workers it spawned.
        try:
            self.proc = subprocess.Popen(list(argv), cwd=cwd, env={**os.environ, **(env or {})}, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError:
            self._log.close()
            raise

    def log_tail(self, chars: int = 2000) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")[-chars:]

    def _exited(self) -> str | None:
        code = self.proc.poll()
        return None if code is None else f"server exited {code}"

    def wait_ready(self, timeout: float = 60.0, path: str = READY_PATH) -> Server:
        try:
            wait_ready(self.url, path, timeout=timeout, exited=self._exited)
        except ServerFailed as e:
            raise ServerFailed(f"{e}; {self.proc.args}; log:\n{self.log_tail()}") from None
        return self

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the orchestrator's stop, so the drain runs), SIGKILL to the group after ``timeout`` s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def service_argv() -> list[str]:
    return [sys.executable, "-m", "service"]


def start_service(env: Mapping[str, str], log_path: Path, *, cwd: Path = ROOT) -> Server:
    """``python -m service`` as a user or an orchestrator runs it, on a free port of 127.0.0.1 (not yet ready)."""
    port = free_port()
    return Server(service_argv(), log_path, port=port, cwd=cwd,
                  env={"RESNET_HOST": HOST, "RESNET_PORT": str(port), **env})


@contextmanager
def serve(server: Server, timeout: float = 60.0) -> Iterator[Server]:
    """``server`` ready for the block's duration, stopped after it whatever happens."""
    try:
        yield server.wait_ready(timeout)
    finally:
        server.stop()


def serve_service(env: Mapping[str, str], log_path: Path, timeout: float = 60.0) -> Iterator[Server]:
    return serve(start_service(env, log_path), timeout)


class ThreadedServer:
    """uvicorn serving an ASGI app from a daemon thread of this process (no signal handlers), so a test can
    look at the app's event loop; same ``url``/``port``/``stop`` as ``Server``."""

    def __init__(self, app, host: str = HOST) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            async def serve(inner, sockets=None) -> None:  # noqa: N805 - inner: the uvicorn server, self: ours
                self.loop = asyncio.get_running_loop()
                await super().serve(sockets)

        self.app, self.port = app, free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.loop = None
        self.server = _Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def _exited(self) -> str | None:
        return None if self.thread.is_alive() else "server thread ended"

    def wait_ready(self, timeout: float = 60.0, path: str = READY_PATH) -> ThreadedServer:
        if self.thread.ident is None:  # not started yet
            self.thread.start()
        wait_ready(self.url, path, timeout=timeout, exited=self._exited)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
