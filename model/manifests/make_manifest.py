"""Record torchvision's resnet18/34/50 as a JSON manifest: keys, shapes, dtypes, logits under known weights,
and the URL and evaluation transform of each one's ImageNet weights.

Run once, with a separate venv that holds torchvision (PyPI's torchvision does not import beside the project's
torch 2.13.0 CPU build; never a dependency of the project or of CI):

    python3 -m venv /work/tvenv && /work/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy
    /work/tvenv/bin/python -m model.manifests.make_manifest

tests/test_pretrained.py then holds our ``build(arch)`` to the manifest with the project's own torch: the
same keys in the same order with the same shapes, and the same logits from the same numpy-made weights.
``state_from_numpy`` and ``sample_input`` are numpy-only, so the generator and the test share them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

ARCHS = ("resnet18", "resnet34", "resnet50")
NUM_CLASSES = 1000
INPUT_SHAPE = (2, 3, 64, 64)  # small enough for CI; 64 px still leaves layer4 a 2 x 2 map
INPUT_SEED = 1
LOGIT_STRIDE = 50  # every 50th of the 1000 logits per image: 20 numbers that span the whole head
MANIFEST = Path(__file__).with_name("torchvision_resnet.json")

NUMPY_DTYPES = {"float32": np.float32, "int64": np.int64}


def fill(index: int, key: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Deterministic weights for the key at ``index`` in state-dict order, scaled so activations stay O(1)."""
    rng = np.random.default_rng(index)
    if dtype == "int64":  # num_batches_tracked: not used in eval, but strict loading needs it
        return rng.integers(0, 1000, size=shape, dtype=np.int64)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_var":
        value = rng.uniform(0.5, 1.5, size=shape)  # must be positive
    elif leaf == "running_mean" or leaf == "bias":
        value = rng.normal(0.0, 0.1, size=shape)
    elif leaf == "weight" and len(shape) == 1:  # a batch norm's scale
        value = rng.uniform(0.5, 1.5, size=shape)
    else:  # a conv or linear weight; variance 1/fan-in (not He's 2/fan-in): with BN statistics fixed, the
        # residual sums of 16 blocks would otherwise grow resnet50's logits into the thousands
        value = rng.normal(0.0, math.sqrt(1.0 / math.prod(shape[1:])), size=shape)
    return value.astype(NUMPY_DTYPES[dtype])


def state_from_numpy(entries: list[list]) -> dict[str, np.ndarray]:
    """Weights for every ``[key, shape, dtype]`` entry, seeded by its position."""
    return {key: fill(i, key, tuple(shape), dtype) for i, (key, shape, dtype) in enumerate(entries)}


def sample_input() -> np.ndarray:
    return np.random.default_rng(INPUT_SEED).standard_normal(INPUT_SHAPE).astype(np.float32)  # (N, C, H, W)


def imagenet_weights(arch: str) -> dict:
    """Where torchvision's default ImageNet weights for ``arch`` live and how they were evaluated."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    t = weights.transforms()
    return {
        "name": str(weights), "url": weights.url, "acc@1": weights.meta["_metrics"]["ImageNet-1K"]["acc@1"],
        "transforms": {"crop_size": t.crop_size, "resize_size": t.resize_size, "mean": t.mean, "std": t.std,
                       "interpolation": t.interpolation.value, "antialias": t.antialias},
    }


def record(arch: str) -> dict:
    import torch
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)
    entries = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in net.state_dict().items()]
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state_from_numpy(entries).items()}, strict=True)
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(sample_input())).double().numpy()  # (N, 1000)
    return {
        "num_params": sum(p.numel() for p in net.parameters()),
        "keys": entries,
        "logits_every": LOGIT_STRIDE,
        "logits": np.round(logits[:, ::LOGIT_STRIDE], 6).tolist(),
        "argmax": logits.argmax(1).tolist(),
        "imagenet_weights": imagenet_weights(arch),
    }


def main() -> None:
    import torch
    import torchvision

    torch.use_deterministic_algorithms(True)
    manifest = {
        "source": f"torchvision {torchvision.__version__}, torch {torch.__version__}, CPU, eval mode",
        "command": "/work/tvenv/bin/python -m model.manifests.make_manifest",
        "input": {"shape": list(INPUT_SHAPE), "numpy": f"default_rng({INPUT_SEED}).standard_normal"},
        "weights": "model.manifests.make_manifest.fill: default_rng(index of the key in state-dict order)",
        "archs": {arch: record(arch) for arch in ARCHS},
    }
    MANIFEST.write_text(json.dumps(manifest, separators=(",", ":")) + "\n")
    print(f"wrote {MANIFEST} ({MANIFEST.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
