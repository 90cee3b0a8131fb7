"""The pieces of a training run that other commands reuse: the device, the seeds, the learning-rate schedule, the
batch augmentation and evaluation. ``model.train`` assembles them into the recipe; ``model.experiment`` measures with
them."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from model.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr``, then cosine or step decay over the remaining steps."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** sum(progress >= m for m in (0.5, 0.75)))
    raise ValueError(f"schedule must be 'cosine' or 'step', got {cfg.schedule!r}")


def augment(x: torch.Tensor, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random translation by zero-padding and cropping back, and optional horizontal flips; any dtype."""
    n, _, h, w = x.shape  # x: (N, C, H, W)
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(mask, x.flip(3), x)
    return x


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, normalise: Callable, device: torch.device) -> dict:
    """Mean cross-entropy and accuracy over a whole loader, in eval mode (running BN statistics)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for pixels, y in loader:
        x = normalise(pixels.to(device))
        y = y.to(device)
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was_training)
    return {"loss": loss_sum / n, "accuracy": correct / n}
