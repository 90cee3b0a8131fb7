"""The pieces of a training run that other commands reuse: the device, the seeds, the learning-rate schedule, the
batch augmentation and evaluation. ``model.train`` assembles them into the recipe; ``model.experiment`` measures with
them."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Distortion:
    """Random geometric and stroke changes per image, for data whose test images vary more than its training images do
    (digits drawn on the page against scikit-learn's size-normalised ones: docs/training.md#drawn-digits). 0 = off."""

    zoom: float = 0.0  # scale by exp(U(-zoom, zoom)), both axes
    stretch: float = 0.0  # then the width alone by exp(U(-stretch, stretch))
    rotate: float = 0.0  # degrees, U(-rotate, rotate)
    shear: float = 0.0  # degrees of horizontal slant, U(-shear, shear)
    translate: float = 0.0  # share of the side, U(-translate, translate) on each axis
    thickness: int = 0  # strokes dilated (or eroded) by a 3x3 max-pool applied up to this many times
    ink: float = 0.0  # share of images re-inked: thresholded at a random level, so blurred strokes come out crisp

    @classmethod
    def of(cls, cfg: TrainConfig) -> Distortion:
        return cls(cfg.zoom, cfg.stretch, cfg.rotate, cfg.shear, cfg.translate, cfg.thickness, cfg.ink)

    @property
    def active(self) -> bool:
        return any((self.zoom, self.stretch, self.rotate, self.shear, self.translate, self.thickness, self.ink))


def thicken(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Each image's bright strokes grown by ``steps[i]`` 3x3 max-pools (shrunk by min-pools where negative)."""
    out = x
    grown, shrunk = x, x
    for k in range(1, int(steps.abs().max()) + 1):
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)
        shrunk = -F.max_pool2d(-shrunk, 3, stride=1, padding=1)
        out = torch.where((steps == k)[:, None, None, None], grown, out)
        out = torch.where((steps == -k)[:, None, None, None], shrunk, out)
    return out


def reink(x: torch.Tensor, chosen: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """The ``chosen`` images (0..255) thresholded softly at their ``level``: a pen's crisp stroke where the 8x8 digits
    upscaled are a blur, thinner for a higher level (the page draws sharp strokes: docs/training.md#drawn-digits)."""
    crisp = ((x - level[:, None, None, None]) * (255 / 24) + 127.5).clamp(0, 255)  # 24 grey levels from black to white
    return torch.where(chosen[:, None, None, None], crisp, x)


def distort(x: torch.Tensor, d: Distortion, gen: torch.Generator) -> torch.Tensor:
    """Re-inking and stroke thickness, then one random affine map per image (affine_grid + grid_sample, black outside);
    x: (N, C, H, W) on the 0..255 scale, float out. The random numbers are drawn on the CPU from ``gen``, so a seed
    gives the same images on every device."""
    n = x.shape[0]
    x = x.float()
    if d.ink:
        chosen = torch.rand(n, generator=gen) < d.ink
        x = reink(x, chosen.to(x.device), (64 + 96 * torch.rand(n, generator=gen)).to(x.device))
    if d.thickness:
        x = thicken(x, torch.randint(-d.thickness, d.thickness + 1, (n,), generator=gen).to(x.device))

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * limit

    zoom, stretch = uniform(d.zoom).exp(), uniform(d.stretch).exp()
    angle, slant = uniform(math.radians(d.rotate)), uniform(math.radians(d.shear))
    tx, ty = uniform(2 * d.translate), uniform(2 * d.translate)  # affine_grid's coordinates span 2 per side
    cos, sin, tan = angle.cos(), angle.sin(), slant.tan()
    # forward map (where an input point lands) = rotation @ shear @ scale; grid_sample wants its inverse
    a = torch.stack([zoom * stretch * cos, zoom * (tan * cos - sin), zoom * stretch * sin, zoom * (tan * sin + cos)],
                    1).view(n, 2, 2)
    inverse = torch.linalg.inv(a)
    theta = torch.cat([inverse, -inverse @ torch.stack([tx, ty], 1)[:, :, None]], 2)  # (N, 2, 3)
    grid = F.affine_grid(theta.float().to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


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
