"""Shared fixtures: real images on disk, made by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
