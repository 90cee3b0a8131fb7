"""Shared fixtures: real images on disk, made by the tests themselves; servers through ``bench.harness``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.harness import Server, start_service

# Apps and servers the tests start leave the gRPC door off unless a test asks for it (with a free port): the
# default 8001 would be shared by every app in the run and by other runs on the machine.
os.environ.setdefault("RESNET_GRPC_PORT", "0")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "default.onnx"


@pytest.fixture(scope="session")
def default_model() -> Path:
    assert DEFAULT_MODEL.exists(), f"the committed default model is missing: {DEFAULT_MODEL}"
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def version_1_model(default_model, tmp_path_factory) -> Path:
    """The default model's weights as a contract version 1 file (stretch, onto black, no fit to content): what
    files exported before version 2 hold."""
    import onnx

    from contract import PREPROCESSING_V2_KEYS, PREPROCESSING_V3_KEYS

    proto = onnx.load(default_model)
    kept = [p for p in proto.metadata_props if p.key not in PREPROCESSING_V2_KEYS + PREPROCESSING_V3_KEYS]
    del proto.metadata_props[:]
    for p in kept:
        proto.metadata_props.add(key=p.key, value=json.dumps(1) if p.key == "contract_version" else p.value)
    path = tmp_path_factory.mktemp("v1") / "version1.onnx"
    onnx.save(proto, path)
    return path


@pytest.fixture(scope="session")
def spec(default_model):
    """The default model's contract, as the service reads it."""
    from service.runtime import Model
    from service.settings import Settings

    return Model.load(Settings(model_path=default_model)).spec


@pytest.fixture(scope="module")
def http(server):
    """An HTTP client on the module's own ``server`` fixture."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


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


@pytest.fixture
def live_server(tmp_path):
    """``live_server(**env)`` starts a ready ``python -m service`` with those settings; all stop after the test."""
    servers: list[Server] = []

    def start(**env: str) -> Server:
        server = start_service(env, tmp_path / f"server{len(servers)}.log")
        servers.append(server)
        return server.wait_ready()

    yield start
    for s in servers:
        s.stop()


def renamed_model(src: Path, dst: Path, name: str) -> None:
    """The same network under another name in its metadata: other bytes, so another version."""
    import onnx

    proto = onnx.load(src)
    for p in proto.metadata_props:
        if p.key == "name":
            p.value = json.dumps(name)
    onnx.save(proto, dst)


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
