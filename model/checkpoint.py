"""Training checkpoints: building the net a config names, what a checkpoint carries, and loading one back.

A checkpoint describes itself: the config that was used, the labels, the preprocessing, the measured metrics, and a
few preprocessed validation images, so export can check onnxruntime against torch without the training data.
"""

from __future__ import annotations

import dataclasses
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from model.config import TrainConfig
from model.data import DataBundle
from model.resnet import ResNet, build

PARITY_IMAGES = 64  # validation images a checkpoint carries for export's parity check


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or not one ``model.train`` wrote; the message says which."""


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int) -> ResNet:
    return build(
        cfg.arch, num_classes=num_classes, in_channels=in_channels, shortcut=cfg.shortcut,
        residual=not cfg.plain, zero_init_residual=cfg.zero_init_residual,
    )


def parity_pixels(bundle: DataBundle, n: int = PARITY_IMAGES) -> torch.Tensor:
    """The first ``n`` validation images as the network's uint8 pixels: (n, C, H, W)."""
    return torch.stack([bundle.val[i][0] for i in range(min(n, len(bundle.val)))])


def describe(cfg: TrainConfig, bundle: DataBundle, parity: torch.Tensor) -> dict:
    """Everything a checkpoint says about itself besides weights and metrics."""
    pre = bundle.preprocessing
    return {
        "config": dataclasses.asdict(cfg), "labels": bundle.labels, "preprocessing": pre.to_metadata(),
        "data": bundle.name, "num_classes": len(bundle.labels), "in_channels": pre.channels,
        "skipped_images": len(bundle.skipped), "parity_images": parity,
    }


def read(path: Path, map_location: torch.device | str = "cpu") -> dict:
    """A checkpoint's contents; ``CheckpointError`` when the file is missing or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is not a checkpoint written by model.train: {e}") from e
    missing = [k for k in ("config", "model", "labels", "preprocessing") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint written by model.train: it lacks {missing}")
    return ckpt


def config_of(ckpt: dict) -> TrainConfig:
    """The recorded config; fields added since the checkpoint was written take their defaults."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """The trained net in eval mode, and the checkpoint it came from."""
    ckpt = read(path)
    net = build_model(config_of(ckpt), ckpt["num_classes"], ckpt["in_channels"])
    net.load_state_dict(ckpt["model"])
    return net.eval(), ckpt
