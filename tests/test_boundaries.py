"""Boundaries: the contract imports neither torch nor onnxruntime, the core no web framework, adopting a foreign
ONNX file no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import contract
from tests.conftest import ROOT


def test_import_contract_loads_neither_torch_nor_onnxruntime():
    code = ("import sys, contract; heavy = sorted(m for m in ('torch', 'onnxruntime', 'fastapi', 'starlette') "
            "if m in sys.modules); print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_import_adopt_loads_no_torch():
    """A user who brings an ONNX file adopts it with onnx and onnxruntime alone (model.adopt)."""
    code = ("import sys, model.adopt; heavy = sorted(m for m in ('torch', 'fastapi', 'service') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        pytest.param({"colour_mode": "CMYK"}, "colour_mode must be one of", id="colour-mode"),
        pytest.param({"resize": "area"}, "resize must be one of", id="resize-filter"),
        pytest.param({"std": [0.0]}, "std must be positive", id="zero-std"),
        pytest.param({"mean": [0.1, 0.2, 0.3]}, "mean and std need 1 values", id="mean-channels"),
        pytest.param({"input_size": "big"}, "malformed preprocessing metadata", id="input-size"),
    ],
)
def test_read_spec_refuses_bad_preprocessing_metadata(meta, message):
    good = {"labels": ["a", "b"], "input_size": [8, 8], "colour_mode": "L", "mean": [0.5], "std": [0.25],
            "resize": "bilinear"}
    inputs = [contract.Tensor(contract.INPUT_NAME, "tensor(float)", ["N", 1, 8, 8])]
    outputs = [contract.Tensor(contract.LOGITS, "tensor(float)", ["N", 2])]
    assert contract.read_spec(good, inputs, outputs, name="m", version="v").labels == ["a", "b"]
    with pytest.raises(contract.ContractError, match=message):
        contract.read_spec({**good, **meta}, inputs, outputs, name="m", version="v")


CORE = ["service.core", "service.batching", "service.preprocessing", "service.runtime", "service.errors",
        "service.settings", "service.metrics", "service.auth", "service.lifecycle", "service.protocol"]


@pytest.mark.parametrize("module", CORE)
def test_import_core_module_loads_no_web_framework(module):
    """Imports point one way: the doors know FastAPI, the core below them knows none."""
    code = (f"import sys, {module}; web = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'uvicorn')); print(web); sys.exit(1 if web else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
