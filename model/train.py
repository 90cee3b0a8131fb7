"""Train a ResNet (or its plain twin) with SGD and weight decay, as in He et al. 2015, Sec. 3.4 and 4.2.

    python -m model.train --data digits --arch resnet20 --epochs 30 --out runs/digits --export models/default.onnx
    python -m model.train --help    # every flag of model.config.TrainConfig, with its default and choices

Multi-GPU (or multi-process on CPU, gloo): ``torchrun --nproc_per_node=N -m model.train ...``.
The phases run in this order: process setup, data, loaders, model, optimiser, resume; then per epoch one pass of SGD,
evaluation, the log line and the checkpoints; at the end the export of the best checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from contract import ContractError
from model import pretrained
from model.checkpoint import CheckpointError, build_model, describe, parity_pixels, read
from model.config import ConfigError, TrainConfig, parse_args, resolved, validate
from model.data import DataBundle, DataError, load_bundle, summary
from model.engine import Distortion, augment, distort, evaluate, lr_at, resolve_device, seed_everything
from model.export import ExportError, export
from model.preprocessing import normaliser
from model.resnet import ResNet

# Fewer SGD steps per epoch than this and a short run ends near chance: 78 images at batch 128 are one step an epoch
# (issue 16, point 5). The run warns rather than changing the batch size behind the user's back.
MIN_STEPS_PER_EPOCH = 5


@dataclass(frozen=True)
class Process:
    """This process's device and its place among torchrun's processes (rank 0 of 1 without torchrun)."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(cfg: TrainConfig) -> Process:
    """Device, process group, threads, seeds and determinism, before anything draws a random number."""
    device = resolve_device(cfg.device)
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    return Process(device, rank, world)


def load_data(cfg: TrainConfig, proc: Process, bundle: DataBundle | None) -> tuple[TrainConfig, DataBundle]:
    """The data set (described on stdout when loaded here), and the config as used: the colour mode and flips that
    default to the data's own are recorded as what they were."""
    if bundle is None:
        bundle = load_bundle(cfg)
        if proc.main:
            print(summary(bundle), flush=True)
    flip = bundle.flip if cfg.flip is None else cfg.flip
    if cfg.pretrained or (cfg.init and bundle.preprocessing.colour_mode == "RGB"):
        bundle = imagenet_normalised(bundle)
    return dataclasses.replace(cfg, colour_mode=bundle.preprocessing.colour_mode, flip=flip), bundle


def imagenet_normalised(bundle: DataBundle) -> DataBundle:
    """The data normalised as ImageNet weights expect: ImageNet's mean/std replace the data's own (for --init too,
    on RGB data: torchvision-format weights are ImageNet's in practice). The shorter-side resize and centre crop
    they were evaluated with come from the config (``model.config.resolved``)."""
    pre = bundle.preprocessing
    if pre.colour_mode != "RGB":
        raise ConfigError(f"--pretrained imagenet weights read RGB images, and {bundle.name} is {pre.colour_mode}")
    imagenet = pretrained.IMAGENET_PREPROCESSING
    return dataclasses.replace(bundle, preprocessing=dataclasses.replace(
        pre, mean=tuple(imagenet["mean"]), std=tuple(imagenet["std"])))


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    sampler: DistributedSampler | None  # None without torchrun: the train loader shuffles with shuffle_gen
    shuffle_gen: torch.Generator


def make_loaders(cfg: TrainConfig, bundle: DataBundle, proc: Process) -> Loaders:
    if cfg.batch_size % proc.world:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be divisible by the {proc.world} processes")
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    sampler = DistributedSampler(bundle.train, proc.world, proc.rank, shuffle=True, seed=cfg.seed) \
        if proc.distributed else None
    train = DataLoader(
        bundle.train, cfg.batch_size // proc.world, shuffle=sampler is None, sampler=sampler, generator=shuffle_gen,
        num_workers=cfg.workers, drop_last=len(bundle.train) >= cfg.batch_size, pin_memory=proc.device.type == "cuda",
    )
    return Loaders(train, DataLoader(bundle.val, 256, num_workers=cfg.workers), sampler, shuffle_gen)


def few_steps_warning(cfg: TrainConfig, images: int, steps: int) -> str | None:
    """What to change when an epoch is too few SGD steps to learn from; None when it is not."""
    if steps >= MIN_STEPS_PER_EPOCH:
        return None
    said = (f"warning: {images} training images at --batch-size {cfg.batch_size} make {steps} SGD step(s) per epoch, "
            f"{steps * cfg.epochs} in all: too few to learn from.")
    batches = [2**k for k in range(1, 12) if images // 2**k >= MIN_STEPS_PER_EPOCH]
    if not batches:
        return f"{said} Add images: even --batch-size 2 gives fewer than {MIN_STEPS_PER_EPOCH} steps per epoch."
    return (f"{said} Pass --batch-size {batches[-1]} ({images // batches[-1]} steps per epoch) and raise --epochs "
            "until the validation accuracy stops improving.")


def make_model(cfg: TrainConfig, bundle: DataBundle, proc: Process) -> tuple[ResNet, nn.Module]:
    """The net (from starting weights when the config names some, its backbone frozen for a linear probe), and
    what the loop calls: the net itself, or its DistributedDataParallel wrapper under torchrun."""
    model = build_model(cfg, len(bundle.labels), bundle.preprocessing.channels)
    if cfg.init:
        pretrained.load_init(model, cfg.init)
    elif cfg.pretrained:
        pretrained.load_init(model, pretrained.fetch(cfg.arch))
    if cfg.freeze_backbone:
        pretrained.freeze_backbone(model)
    model = model.to(proc.device)
    if not proc.distributed:
        return model, model
    device_ids = [proc.device.index] if proc.device.type == "cuda" else None
    return model, nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def make_optimiser(cfg: TrainConfig, model: nn.Module) -> torch.optim.SGD:
    """SGD with momentum; weight decay on every trainable parameter, as in the paper. Two groups, the backbone's
    and the head's, each with the ``lr_scale`` the loop multiplies the schedule by."""
    groups = pretrained.param_groups(model, cfg.backbone_lr_scale)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@dataclass
class Progress:
    """What a run has done so far, and what a resumed run continues from."""

    epoch: int = 0  # epochs completed
    best: dict | None = None  # the record of the epoch with the best validation accuracy
    history: list[dict] = field(default_factory=list)


def resume(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, loaders: Loaders, aug_gen: torch.Generator,
           device: torch.device) -> Progress:
    """Weights, optimiser, progress and every random generator as a last.pt left them."""
    state = read(Path(path), map_location=device)
    if "optimizer" not in state:
        raise CheckpointError(f"{path} holds no optimiser state (a best.pt?); resume from the run's last.pt")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    loaders.shuffle_gen.set_state(state["shuffle_rng"])
    aug_gen.set_state(state["aug_rng"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(state["epoch"], state["best"], state["history"])


def train_one_epoch(cfg: TrainConfig, epoch: int, net: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                    normalise: Callable, flip: bool, aug_gen: torch.Generator, proc: Process) -> tuple[float, float]:
    """One pass of SGD over the training set; returns the mean loss and error on its augmented batches, over every
    process."""
    device = proc.device
    net.train()
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss_sum = torch.zeros((), device=device)
    wrong = torch.zeros((), device=device)
    seen = 0
    show = cfg.progress and proc.main
    distortion = Distortion.of(cfg)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False, dynamic_ncols=True)
    for i, (pixels, y) in enumerate(bar):
        step = epoch * steps_per_epoch + i
        lr = lr_at(cfg, step, total_steps, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        pixels = pixels.to(device, non_blocking=True)
        if distortion.active:
            pixels = distort(pixels, distortion, aug_gen)
        x = normalise(augment(pixels, cfg.shift, flip, aug_gen))  # x: (N, C, H, W)
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
        if show and i % 5 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{1 - wrong.item() / seen:.4f}")
    stats = torch.stack([loss_sum, wrong, torch.tensor(float(seen), device=device)])
    if proc.distributed:
        dist.all_reduce(stats)
    return stats[0].item() / stats[2].item(), stats[1].item() / stats[2].item()


def log_epoch(out: Path, record: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(
        f"epoch {record['epoch']:3d}  train loss {record['train_loss']:.4f} err {record['train_error']:.4f}  "
        f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f}  {record['seconds']:.1f}s",
        flush=True,
    )


def save_checkpoints(out: Path, meta: dict, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
                     improved: bool, loaders: Loaders, aug_gen: torch.Generator) -> None:
    """best.pt when the epoch improved on the best; last.pt always, with all a resume needs."""
    record = progress.history[-1]
    if improved:
        torch.save({**meta, "model": model.state_dict(), "metrics": record}, out / "best.pt")
    torch.save({
        **meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": progress.epoch,
        "best": progress.best, "history": progress.history, "metrics": record,
        "shuffle_rng": loaders.shuffle_gen.get_state(), "aug_rng": aug_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }, out / "last.pt")


def train(cfg: TrainConfig, on_epoch: Callable[[dict, ResNet], None] | None = None,
          bundle: DataBundle | None = None) -> dict:
    """Run the whole recipe; returns the best epoch's record. ``on_epoch`` sees each epoch's record; ``bundle`` is
    data the caller has loaded already (by default, the data ``cfg`` names)."""
    # setup, data, model, optimiser, resume
    validate(cfg)
    cfg = resolved(cfg)
    proc = setup(cfg)
    cfg, bundle = load_data(cfg, proc, bundle)
    loaders = make_loaders(cfg, bundle, proc)
    if proc.main and (warning := few_steps_warning(cfg, len(bundle.train), len(loaders.train))):
        print(warning, file=sys.stderr, flush=True)
    normalise = normaliser(bundle.preprocessing, proc.device)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1000 * proc.rank)
    model, net = make_model(cfg, bundle, proc)
    optimizer = make_optimiser(cfg, model)
    progress = resume(cfg.resume, model, optimizer, loaders, aug_gen, proc.device) if cfg.resume else Progress()
    # the run directory: the config as used, and what every checkpoint says about itself
    out = Path(cfg.out)
    if proc.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        meta = describe(cfg, bundle, parity_pixels(bundle))

    # per epoch: one pass of SGD, evaluation, the log line, the checkpoints
    for epoch in range(progress.epoch, cfg.epochs):
        if loaders.sampler is not None:
            loaders.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        train_loss, train_error = train_one_epoch(cfg, epoch, net, optimizer, loaders.train, normalise, cfg.flip,
                                                  aug_gen, proc)
        seconds = time.perf_counter() - t0
        val = evaluate(model, loaders.val, normalise, proc.device)
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_error": train_error,  # on augmented batches, running
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": optimizer.param_groups[-1]["lr"],  # the head's: the schedule's own
            "seconds": round(seconds, 3),
        }
        improved = progress.best is None or record["val_accuracy"] > progress.best["val_accuracy"]
        progress.epoch = epoch + 1
        progress.history.append(record)
        if improved:
            progress.best = record
        if proc.main:
            log_epoch(out, record)
            save_checkpoints(out, meta, model, optimizer, progress, improved, loaders, aug_gen)
        if on_epoch is not None:
            on_epoch(record, model)

    # teardown, and the export of the best checkpoint
    if proc.distributed:
        dist.barrier()
        dist.destroy_process_group()
    if proc.main and cfg.export:
        export(out / "best.pt", Path(cfg.export))
    return progress.best or {}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, description=__doc__.splitlines()[0])
    try:
        best = train(cfg)
    except (ConfigError, ContractError, DataError, CheckpointError, ExportError, pretrained.WeightsError) as e:
        raise SystemExit(f"error: {e}") from e
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"best": best}), file=sys.stderr)


if __name__ == "__main__":
    main()
