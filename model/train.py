"""Train a ResNet (or its plain twin) with SGD and weight decay, as in He et al. 2015, Sec. 3.4 and 4.2.

    python -m model.train --data digits --arch resnet20 --epochs 30 --out runs/digits --export models/default.onnx

Multi-GPU (or multi-process on CPU, gloo): ``torchrun --nproc_per_node=N -m model.train ...``.
Every field of ``TrainConfig`` is a command-line flag of the same name (``--weight-decay`` for
``weight_decay``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from model import data as datasets
from model.resnet import ResNet, build


@dataclass
class TrainConfig:
    # model
    arch: str = "resnet20"  # resnet20/32/44/56/110 (CIFAR style) or resnet18/34/50 (ImageNet style)
    shortcut: str = "A"  # "A": zero-padding, parameter-free; "B": learned 1x1 projection (Sec. 3.3)
    plain: bool = False  # drop every skip connection (the paper's "plain" baseline)
    zero_init_residual: bool = False  # zero the last BN scale of each branch: blocks start as the identity
    # data
    data: str = "digits"  # "digits" (embedded), "cifar10", or a folder path root/<label>/*.png
    data_dir: str = "data"  # where the CIFAR-10 archive lives (or is downloaded to with --download)
    download: bool = False  # fetch CIFAR-10 if it is not on disk (never done implicitly)
    image_size: int = 32  # input H = W, pixels
    colour_mode: str = "RGB"  # for folder data: "RGB" or "L" (digits is always "L", CIFAR always "RGB")
    resize: str = "bilinear"  # Pillow filter used to bring images to image_size
    val_fraction: float = 0.2  # share of each class held out when the data has no val/ split
    split_seed: int = 0  # the split is fixed across training seeds so every run is scored on the same images
    shift: int = 2  # augmentation: random translation of up to this many pixels (pad + crop)
    flip: bool | None = None  # augmentation: random horizontal flips (default: on for CIFAR-10 and folders)
    # optimisation
    epochs: int = 30
    batch_size: int = 128  # global, over all processes
    lr: float = 0.05  # peak learning rate for batch_size; the paper uses 0.1 at 128
    momentum: float = 0.9
    weight_decay: float = 5e-4  # L2 penalty (the paper: 1e-4 on CIFAR/ImageNet; 5e-4 suits the small digits set)
    schedule: str = "cosine"  # "cosine" or "step" (/10 at 50% and 75% of training, as Sec. 4.2)
    warmup_epochs: float = 1.0  # linear warm-up from warmup_lr; the paper warms deep nets at 0.01 (Sec. 4.2)
    warmup_lr: float = 0.01
    label_smoothing: float = 0.0
    # run
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when present, with bf16 autocast), "cuda", "cpu"
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    workers: int = 0  # DataLoader worker processes (folder data only needs them)
    out: str = "runs/default"  # run directory: log.jsonl, best.pt, last.pt
    resume: str = ""  # path of a last.pt to continue from
    export: str = ""  # write the best model as ONNX here when training ends
    progress: bool = True  # tqdm bar per epoch


def add_config_flags(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None, skip: tuple = ()) -> None:
    """One flag per ``TrainConfig`` field but those in ``skip`` (``--weight-decay`` for ``weight_decay``)."""
    defaults = defaults or TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type in ("bool", "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, default=default)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_flags(parser)
    return TrainConfig(**vars(parser.parse_args(argv)))


# --- helpers ----------------------------------------------------------------------------------


def load_bundle(cfg: TrainConfig) -> datasets.DataBundle:
    if cfg.data == "digits":
        return datasets.load_digits_data(cfg.image_size, cfg.val_fraction, cfg.split_seed, cfg.resize)
    if cfg.data == "cifar10":
        return datasets.load_cifar10_data(Path(cfg.data_dir), cfg.image_size, cfg.resize, cfg.download)
    return datasets.load_folder_data(
        Path(cfg.data), cfg.image_size, cfg.colour_mode, cfg.val_fraction, cfg.split_seed, cfg.resize,
        flip=True if cfg.flip is None else cfg.flip,
    )


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int) -> ResNet:
    return build(
        cfg.arch, num_classes=num_classes, in_channels=in_channels, shortcut=cfg.shortcut,
        residual=not cfg.plain, zero_init_residual=cfg.zero_init_residual,
    )


def augment(x: torch.Tensor, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random translation by zero-padding and cropping back, and optional horizontal flips."""
    n, _, h, w = x.shape  # x: (N, C, H, W) float in [0, 1]
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


def lr_at(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** sum(progress >= m for m in (0.5, 0.75)))
    raise ValueError(f"schedule must be 'cosine' or 'step', got {cfg.schedule!r}")


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


# --- training ---------------------------------------------------------------------------------


def train(cfg: TrainConfig, on_epoch: Callable[[dict, ResNet], None] | None = None) -> dict:
    """Run the whole recipe; returns the best epoch's record. ``on_epoch`` sees each epoch's record."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(cfg.device)
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    main_process = rank == 0
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)

    # data
    bundle = load_bundle(cfg)
    pre = bundle.preprocessing
    flip = bundle.flip if cfg.flip is None else cfg.flip
    if cfg.batch_size % world:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    per_rank_batch = cfg.batch_size // world
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    sampler = DistributedSampler(bundle.train, world, rank, shuffle=True, seed=cfg.seed) if distributed else None
    train_loader = DataLoader(
        bundle.train, per_rank_batch, shuffle=sampler is None, sampler=sampler, generator=shuffle_gen,
        num_workers=cfg.workers, drop_last=len(bundle.train) >= cfg.batch_size, pin_memory=device.type == "cuda",
    )
    val_loader = DataLoader(bundle.val, 256, num_workers=cfg.workers)
    mean = torch.tensor(pre.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, -1, 1, 1)

    def normalise(pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / 255.0 - mean) / std  # (N, C, H, W) uint8 -> normalised float32

    aug_gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)

    # model
    model = build_model(cfg, len(bundle.labels), pre.channels).to(device)
    net: torch.nn.Module = model
    if distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # optimiser: SGD with momentum; weight decay on every parameter as in the paper
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    start_epoch, best, history = 0, None, []
    out = Path(cfg.out)
    if cfg.resume:
        state = torch.load(cfg.resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]
        shuffle_gen.set_state(state["shuffle_rng"])
        aug_gen.set_state(state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    # loop
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        wrong = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and main_process),
                   leave=False, dynamic_ncols=True)
        for i, (pixels, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step, total_steps, steps_per_epoch)
            x = augment(pixels.to(device, non_blocking=True).float() / 255.0, cfg.shift, flip, aug_gen)
            x = (x - mean) / std  # x: (N, C, H, W)
            y = y.to(device, non_blocking=True)
            with autocast:
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1} step {i}: "
                                         "lower --lr or lengthen --warmup-epochs")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            wrong += (logits.argmax(1) != y).sum()
            seen += len(y)
            if cfg.progress and main_process and i % 5 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{1 - wrong.item() / seen:.4f}")
        stats = torch.stack([loss_sum, wrong, torch.tensor(float(seen), device=device)])
        if distributed:
            dist.all_reduce(stats)
        epoch_seconds = time.perf_counter() - t0
        val = evaluate(model, val_loader, normalise, device)
        record = {
            "epoch": epoch + 1,
            "train_loss": stats[0].item() / stats[2].item(),
            "train_error": stats[1].item() / stats[2].item(),  # on augmented batches, running
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(epoch_seconds, 3),
        }
        history.append(record)
        improved = best is None or record["val_accuracy"] > best["val_accuracy"]
        if improved:
            best = record
        if main_process:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"epoch {epoch + 1:3d}  train loss {record['train_loss']:.4f} err {record['train_error']:.4f}  "
                f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f}  {epoch_seconds:.1f}s",
                flush=True,
            )
            meta = {
                "config": dataclasses.asdict(cfg), "labels": bundle.labels, "preprocessing": pre.to_metadata(),
                "data": bundle.name, "num_classes": len(bundle.labels), "in_channels": pre.channels,
            }
            if improved:
                torch.save({**meta, "model": model.state_dict(), "metrics": record}, out / "best.pt")
            torch.save({
                **meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                "best": best, "history": history, "metrics": record, "shuffle_rng": shuffle_gen.get_state(),
                "aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state(),
            }, out / "last.pt")
        if on_epoch is not None:
            on_epoch(record, model)

    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if main_process and cfg.export:
        from model.export import export

        export(out / "best.pt", Path(cfg.export))
    return best or {}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        best = train(cfg)
    except datasets.DataError as e:
        raise SystemExit(f"error: {e}") from e
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"best": best}), file=sys.stderr)


if __name__ == "__main__":
    main()
