"""Transfer learning from torchvision-format weights: load a backbone, fetch ImageNet weights, split or freeze.

Our resnet18/34/50 carry torchvision's parameter names and shapes (held to torchvision itself by
tests/test_pretrained.py through model/manifests/), so a torchvision state dict loads into them strictly;
only the classifier head ``fc`` is the user's own, sized for their labels.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

HEAD = "fc"  # the classifier, replaced for the user's labels; everything else is the backbone

# torchvision's IMAGENET1K_V1 files (torchvision/models/resnet.py). torchvision pins only the first 8 hex digits
# of each file's sha256 (in its name; torch.hub checks that prefix), so that prefix is what is checked here.
# resnet50's IMAGENET1K_V2 (80.9% against 76.1% top-1) is left out: it is evaluated at resize 232, not 256.
IMAGENET_WEIGHTS: dict[str, tuple[str, str]] = {
    "resnet18": ("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd"),
    "resnet34": ("https://download.pytorch.org/models/resnet34-b627a593.pth", "b627a593"),
    "resnet50": ("https://download.pytorch.org/models/resnet50-0676ba61.pth", "0676ba61"),
}

# How the ImageNet weights were evaluated (torchvision's ImageClassification transform): RGB, the shorter side
# resized to 256 (bilinear, antialiased), a 224 x 224 centre crop (crop fraction 0.875), then mean/std.
IMAGENET_PREPROCESSING: dict[str, object] = {
    "colour_mode": "RGB",
    "input_size": [224, 224],
    "resize_mode": "shorter-side-crop",
    "resize_size": 256,
    "crop_fraction": 0.875,
    "resize": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}

CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict")  # where checkpoints commonly keep the state dict
SHOWN = 3  # keys named per kind of mismatch in an error


class WeightsError(ValueError):
    """A weights file cannot be fetched, read, or loaded into the net; the message says which keys or why."""


# --- reading and loading --------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a bare one (torchvision's .pth) or a checkpoint dict holding one."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: no code runs
    except FileNotFoundError as e:
        raise WeightsError(f"no weights file at {path}") from e
    except Exception as e:  # torch raises several types (UnpicklingError, RuntimeError, EOFError) for such files
        raise WeightsError(f"{path} is not a torch weights file: {e}") from e
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds neither a state dict nor a checkpoint with one under {CHECKPOINT_KEYS}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def is_head(key: str) -> bool:
    return key.split(".", 1)[0] == HEAD


def load_backbone(net: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy every backbone tensor of ``state`` into ``net``, strictly; ``net``'s own head is kept as built.

    Any backbone key missing from ``state``, unexpected in it, or of another shape fails before anything is
    copied, with the first few of each named.
    """
    ours = net.state_dict()
    missing = [k for k in ours if not is_head(k) and k not in state]
    unexpected = [k for k in state if not is_head(k) and k not in ours]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(ours[k].shape)} in the net"
              for k in ours if not is_head(k) and k in state and state[k].shape != ours[k].shape]
    problems = [f"{len(keys)} {kind} ({', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''})"
                for kind, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
                if keys]
    if problems:
        raise WeightsError(f"the weights do not fit the net's backbone: {'; '.join(problems)}")
    net.load_state_dict({k: v for k, v in state.items() if not is_head(k)}, strict=False)  # only the head is left


def load_init(net: nn.Module, path: str | Path) -> None:
    """``--init PATH``: the backbone from a torchvision-format weights file, the head fresh for our labels."""
    load_backbone(net, read_state_dict(path))


# --- fetching torchvision's ImageNet weights ------------------------------------------------------------------------


def default_cache() -> Path:
    """torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints), so files torchvision fetched are reused."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(arch: str, url: str | None = None, sha256: str | None = None, dest: str | Path | None = None) -> Path:
    """``--pretrained imagenet``: the weights file for ``arch``, downloaded once into ``dest`` and checked.

    ``url`` and ``sha256`` default to the pinned ``IMAGENET_WEIGHTS``; ``sha256`` is a full hex digest or a prefix
    of one (at least 8 digits). A cached file is checked again before use; a download whose hash differs is
    removed and refused. Only ever called when the user asks for the weights.
    """
    if url is None or sha256 is None:
        if arch not in IMAGENET_WEIGHTS:
            raise WeightsError(f"no ImageNet weights for {arch!r}; pinned: {sorted(IMAGENET_WEIGHTS)}")
        url, sha256 = url or IMAGENET_WEIGHTS[arch][0], sha256 or IMAGENET_WEIGHTS[arch][1]
    expected = sha256.lower()
    if len(expected) < 8 or any(c not in "0123456789abcdef" for c in expected):
        raise WeightsError(f"sha256 must be at least 8 hex digits, got {sha256!r}")
    folder = Path(dest) if dest is not None else default_cache()
    target = folder / Path(urllib.parse.urlparse(url).path).name
    if target.exists():
        if sha256_of(target).startswith(expected):
            return target
        target.unlink()  # a damaged or replaced cache entry: fetch it again
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(partial, "wb") as f:
            shutil.copyfileobj(r, f)
        digest = sha256_of(partial)
        if not digest.startswith(expected):
            raise WeightsError(f"{url} has sha256 {digest}, expected {expected}...; the download was removed")
        os.replace(partial, target)
    except OSError as e:
        raise WeightsError(f"could not download {url}: {e}") from e
    finally:
        partial.unlink(missing_ok=True)
    return target


# --- fine-tuning and linear probes ----------------------------------------------------------------------------------


def backbone_and_head_params(net: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable parameters split into the backbone's and the head's, for optimiser groups."""
    backbone, head = [], []
    for name, p in net.named_parameters():
        if p.requires_grad:
            (head if is_head(name) else backbone).append(p)
    return backbone, head


def param_groups(net: nn.Module, backbone_lr_scale: float) -> list[dict]:
    """Optimiser groups: the backbone's learning rate is the schedule's times ``lr_scale``, the head's the schedule's.

    A loop that sets the rate each step must multiply by ``group["lr_scale"]``.
    """
    if not backbone_lr_scale > 0:
        raise ValueError(f"backbone_lr_scale must be positive (freeze_backbone for none), got {backbone_lr_scale}")
    backbone, head = backbone_and_head_params(net)
    groups = [{"params": head, "lr_scale": 1.0}]
    if backbone:  # none left after freeze_backbone
        groups.insert(0, {"params": backbone, "lr_scale": backbone_lr_scale})
    return groups


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A batch norm that stays in eval mode: it normalises with its running statistics and never updates them.

    Same parameters and buffers as ``nn.BatchNorm2d``, so state dicts and the ONNX export are unchanged.
    """

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        return super().train(False)


def freeze_backbone(net: nn.Module) -> nn.Module:
    """A linear probe: only the head trains. Every backbone parameter stops requiring gradients and every backbone
    batch norm becomes a ``FrozenBatchNorm2d``, so ``net.train()`` no longer moves its statistics either."""
    for name, p in net.named_parameters():
        if not is_head(name):
            p.requires_grad_(False)
    for parent_name, parent in list(net.named_modules()):
        if is_head(parent_name):
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                frozen = FrozenBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                           child.track_running_stats)
                frozen.load_state_dict(child.state_dict())
                frozen.to(next(itertools.chain(child.parameters(), child.buffers())).device)
                frozen.requires_grad_(False)
                frozen.eval()
                setattr(parent, name, frozen)
    return net
