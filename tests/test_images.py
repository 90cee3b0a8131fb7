"""The test images and helpers the service tests share: the same pixels the default model was validated on,
and no torch anywhere on the service tests' import path."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.images import IMAGE_SIZE, RESIZE, SPLIT_SEED, VAL_FRACTION, validation_digits

# Every test module of the service side (and the helpers they share); each must import without torch.
SERVICE_TEST_MODULES = (
    "bench.harness", "tests.conftest", "tests.images", "tests.hostile", "tests.test_access_and_reload",
    "tests.test_api_schema", "tests.test_batching", "tests.test_bombs", "tests.test_disconnects", "tests.test_fuzz",
    "tests.test_harness", "tests.test_server_process", "tests.test_service", "tests.test_v2", "tests.test_bench",
    "tests.test_boundaries",
)


def test_validation_digits_equal_model_data_byte_for_byte():
    pytest.importorskip("torch", reason="model.data needs torch; the service-side images do not")
    from model.data import load_digits_data

    pixels, labels = load_digits_data(IMAGE_SIZE, VAL_FRACTION, SPLIT_SEED, RESIZE).val.tensors
    images, ours = validation_digits()
    assert ours == labels.tolist()
    assert len(images) == 360 and {img.mode for img in images} == {"L"}
    assert np.array_equal(np.stack([np.asarray(img) for img in images]), pixels[:, 0].numpy())


def test_import_service_test_modules_loads_no_torch():
    code = (f"import importlib, sys\nfor m in {SERVICE_TEST_MODULES!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-2000:]
