"""Shared fixtures: real images on disk, made by the tests themselves."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Apps and servers the tests start leave the gRPC door off unless a test asks for it (with a free port): the
# default 8001 would be shared by every app in the run and by other runs on the machine.
os.environ.setdefault("RESNET_GRPC_PORT", "0")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "default.onnx"


@pytest.fixture(scope="session")
def default_model() -> Path:
    assert DEFAULT_MODEL.exists(), f"the committed default model is missing: {DEFAULT_MODEL}"
    return DEFAULT_MODEL


def make_class_folder(root: Path, classes: dict[str, int], size: int = 12, per_class: int = 6) -> Path:
    """root/<label>/<i>.png: each class a distinct brightness pattern, so a net can tell them apart."""
    rng = np.random.default_rng(0)
    for k, (label, value) in enumerate(classes.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            arr[:, k::len(classes)] = value
            fmt = "PNG" if i % 2 else "JPEG"
            Image.fromarray(arr, "RGB").save(root / label / f"{i}.{fmt.lower()}", fmt)
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``python -m service`` as a real process on 127.0.0.1, as a user or orchestrator runs it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "RESNET_HOST": "127.0.0.1", "RESNET_PORT": str(self.port), **env}
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=full_env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> int:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@contextmanager
def running_server(env: dict[str, str], log_path: Path) -> Iterator[LiveServer]:
    """A ready ``LiveServer`` for the block's duration (module-scoped fixtures share one)."""
    server = LiveServer(env, log_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def live_server(tmp_path):
    servers: list[LiveServer] = []

    def start(**env: str) -> LiveServer:
        server = LiveServer(env, tmp_path / f"server{len(servers)}.log")
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for s in servers:
        s.stop()


def loading_as(cls):
    """A ``load_model`` for ``create_app`` that loads the real model, then gives it ``cls``'s behaviour
    (a ``Model`` subclass): the seam fault-injection tests use instead of patching onnxruntime."""

    def load(settings):
        from service.runtime import Model

        model = Model.load(settings)
        model.__class__ = cls
        return model

    return load


def loading_after(gate):
    """A ``load_model`` that loads the real model only once ``gate`` (a threading.Event) is set."""

    def load(settings):
        from service.runtime import Model

        gate.wait(30)
        return Model.load(settings)

    return load
