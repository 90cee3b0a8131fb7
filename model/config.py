"""The training recipe as one dataclass: every field is a command-line flag of the same name (``--weight-decay`` for
``weight_decay``), and its help text, default and choices come from the field itself, written once."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from contract import COLOUR_MODES, RESIZE_FILTERS, RESIZE_MODES


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field whose metadata is its flag's help text and, where the values are few, its choices."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # model
    arch: str = option("resnet20", "resnet<6n+2> (20, 32, 44, 56, 110: CIFAR style) or resnet18/34/50 (ImageNet "
                                   "style)")
    shortcut: str | None = option(None, "A: zero-padding, parameter-free; B: learned 1x1 projection (Sec. 3.3); "
                                        "default A, and B (torchvision's layout) with --init or --pretrained",
                                  ("A", "B"))
    plain: bool = option(False, "drop every skip connection (the paper's plain baseline)")
    zero_init_residual: bool = option(False, "zero the last BN scale of each residual branch: blocks start as the "
                                             "identity")
    # transfer learning (resnet18/34/50: torchvision's parameter names and shapes; the head is always new)
    init: str = option("", "start the backbone from this torchvision-format state dict (.pth or a checkpoint)")
    pretrained: str = option("", "imagenet: start from torchvision's ImageNet weights, downloaded (pinned URL and "
                                 "sha256) into torch.hub's cache; records ImageNet's mean/std", ("", "imagenet"))
    freeze_backbone: bool = option(False, "linear probe: train only the new head, the backbone (and its BN "
                                          "statistics) stay as loaded")
    backbone_lr_scale: float = option(1.0, "fine-tuning: the backbone's learning rate is the schedule's times this "
                                           "(e.g. 0.1), the head's the schedule's")
    # data
    data: str = option("digits", "digits (embedded, no download), cifar10, or a folder path root/<label>/*.png "
                                 "(optionally root/train and root/val)")
    data_dir: str = option("data", "where the CIFAR-10 archive lives (or is downloaded to with --download)")
    download: bool = option(False, "fetch CIFAR-10 if it is not on disk (never done implicitly)")
    image_size: int = option(32, "input height = width the network sees, pixels")
    colour_mode: str | None = option(None, "L (grayscale) or RGB (default: L for digits, RGB for CIFAR-10 "
                                           "and folders)", tuple(COLOUR_MODES))
    resize: str = option("bilinear", "Pillow filter that brings images to --image-size", tuple(RESIZE_FILTERS))
    resize_mode: str | None = option(None, "stretch to --image-size (aspect ratio lost), shorter-side-crop (scale to "
                                           "cover, centre crop) or pad (scale to fit, pad with --background); "
                                           "default stretch, and shorter-side-crop with --init or --pretrained",
                                     RESIZE_MODES)
    crop_fraction: float | None = option(None, "shorter-side-crop: the crop's share of the resized side, (0, 1]; "
                                               "default 0.875 (torchvision's ImageNet evaluation: 224 of 256)")
    background: str = option("", "what transparency is flattened onto and padding filled with: one 0..255 value per "
                                 "channel, comma-separated (255,255,255 is white), or one for all; none is black")
    fit_to_content: bool = option(False, "drawings: crop each image to its ink (pixels differing from --background "
                                         "by more than --fit-threshold), centre it in a square, then resize")
    fit_margin: float = option(0.1, "fit-to-content: margin on each side, as a fraction of the ink's longer side")
    fit_threshold: int = option(32, "fit-to-content: how far (0..254) from the background a pixel is ink")
    synthetic: int = option(0, "digits only: add this many synthetic pen-drawn digits per class (model/strokes.py, "
                               "seeded by --split-seed) to the training split; validation stays scikit-learn's")
    val_fraction: float = option(0.2, "share of each class held out for validation when the data has no val/ split")
    split_seed: int = option(0, "seed of the train/val split, fixed across training seeds so every run is scored on "
                                "the same images")
    skip_bad_images: bool = option(False, "train without the folder's unreadable images (counted in the log) "
                                          "instead of stopping with their list")
    shift: int = option(2, "augmentation: random translation by up to this many pixels (pad + crop)")
    flip: bool | None = option(None, "augmentation: random horizontal flips (default: on for CIFAR-10 and "
                                     "folders, off for digits)")
    zoom: float = option(0.0, "augmentation: random scale by exp(U(-zoom, zoom)), e.g. 0.15: factors 0.86 to 1.16")
    stretch: float = option(0.0, "augmentation: then the width alone by exp(U(-stretch, stretch))")
    rotate: float = option(0.0, "augmentation: random rotation by up to this many degrees")
    shear: float = option(0.0, "augmentation: random horizontal slant by up to this many degrees")
    translate: float = option(0.0, "augmentation: random sub-pixel translation by up to this share of the side")
    thickness: int = option(0, "augmentation: strokes grown or thinned by up to this many 3x3 max-pools (bright "
                               "ink on dark)")
    ink: float = option(0.0, "augmentation: share of images re-inked, thresholded at a random level so blurred "
                             "strokes come out crisp, as drawn with a pen (0..1; for bright ink on dark)")
    # optimisation
    epochs: int = option(30, "passes over the training set")
    batch_size: int = option(128, "images per SGD step, global over all processes")
    lr: float = option(0.05, "peak learning rate at --batch-size (the paper: 0.1 at 128)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "L2 penalty on every parameter (the paper: 1e-4 on CIFAR/ImageNet; 5e-4 "
                                       "suits the small digits set)")
    schedule: str = option("cosine", "cosine, or step: lr / 10 at half and at three quarters of training (Sec. 4.2)",
                           ("cosine", "step"))
    warmup_epochs: float = option(1.0, "epochs of linear warm-up from --warmup-lr (the paper warms deep nets at "
                                       "0.01, Sec. 4.2)")
    warmup_lr: float = option(0.01, "learning rate the warm-up starts from")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing, 0 = none")
    # run
    seed: int = option(0, "seed of the weights, the shuffling and the augmentation")
    device: str = option("auto", "auto: CUDA when present (with bf16 autocast), else CPU", ("auto", "cuda", "cpu"))
    threads: int = option(0, "CPU threads for torch; 0 = torch's default")
    workers: int = option(0, "DataLoader worker processes (only folder data needs them)")
    out: str = option("runs/default", "run directory: config.json, log.jsonl, best.pt, last.pt")
    resume: str = option("", "path of a last.pt to continue from, up to --epochs in all")
    export: str = option("", "write the best model as ONNX here when training ends")
    progress: bool = option(True, "a progress bar per epoch")


class ConfigError(ValueError):
    """Flags that cannot be used together; the message names them and says what to do."""


def validate(cfg: TrainConfig) -> None:
    """Refuse combinations of flags that would silently do something else than asked."""
    from model.pretrained import IMAGENET_WEIGHTS  # torch-heavy; only when checking a run

    if cfg.init and cfg.pretrained:
        raise ConfigError("--init and --pretrained both name starting weights: pass one of them")
    if cfg.pretrained and cfg.arch not in IMAGENET_WEIGHTS:
        raise ConfigError(f"--pretrained {cfg.pretrained} needs --arch {' or '.join(sorted(IMAGENET_WEIGHTS))}, "
                          f"got {cfg.arch}")
    if cfg.pretrained and cfg.colour_mode == "L":
        raise ConfigError(f"--pretrained {cfg.pretrained} weights read RGB images: drop --colour-mode L")
    if cfg.freeze_backbone and not (cfg.init or cfg.pretrained):
        raise ConfigError("--freeze-backbone needs starting weights: pass --init PATH or --pretrained imagenet")
    if not cfg.backbone_lr_scale > 0:
        raise ConfigError(f"--backbone-lr-scale must be positive, got {cfg.backbone_lr_scale} "
                          "(--freeze-backbone trains no backbone at all)")
    if cfg.backbone_lr_scale != 1.0 and cfg.freeze_backbone:
        raise ConfigError("--backbone-lr-scale has no effect with --freeze-backbone: pass one of them")
    if cfg.backbone_lr_scale != 1.0 and not (cfg.init or cfg.pretrained):
        raise ConfigError("--backbone-lr-scale needs starting weights: pass --init PATH or --pretrained imagenet")
    mode = resolved(cfg).resize_mode
    if cfg.crop_fraction is not None and mode != "shorter-side-crop":
        raise ConfigError(f"--crop-fraction applies to --resize-mode shorter-side-crop, and the run's is {mode}")
    defaults = TrainConfig()
    if not cfg.fit_to_content and (cfg.fit_margin, cfg.fit_threshold) != (defaults.fit_margin, defaults.fit_threshold):
        raise ConfigError("--fit-margin and --fit-threshold need --fit-to-content")
    background(cfg, 3)  # the syntax; the channel count is the data's


def background(cfg: TrainConfig, channels: int) -> tuple[int, ...] | None:
    """--background as one value per channel (None: the contract's black); ``ConfigError`` when it is not that."""
    if not cfg.background:
        return None
    try:
        values = tuple(int(v) for v in cfg.background.split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values *= channels
    if len(values) != channels or not all(0 <= v <= 255 for v in values):
        raise ConfigError(f"--background {cfg.background!r}: give one 0..255 value, or {channels} comma-separated")
    return values


def resolved(cfg: TrainConfig) -> TrainConfig:
    """The config with the defaults that depend on other flags filled in, as a run records it: torchvision's weights
    get torchvision's layout (shortcut B) and the preprocessing they were evaluated with (shorter side, centre crop
    0.875; ImageNet's mean/std are the data's business, ``model.train``)."""
    transfer = bool(cfg.init or cfg.pretrained)
    mode = cfg.resize_mode or ("shorter-side-crop" if transfer else "stretch")
    fraction = cfg.crop_fraction
    if fraction is None and mode == "shorter-side-crop":
        from model.pretrained import IMAGENET_PREPROCESSING  # torch-heavy; only when the crop needs its default

        fraction = IMAGENET_PREPROCESSING["crop_fraction"]
    return dataclasses.replace(cfg, shortcut=cfg.shortcut or ("B" if transfer else "A"), resize_mode=mode,
                               crop_fraction=fraction)


FLAG_TYPES = {"int": int, "float": float, "str": str, "str | None": str, "float | None": float}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None, skip: tuple = ()) -> None:
    """One flag per ``TrainConfig`` field but those in ``skip``, with the field's help, default and choices."""
    defaults = defaults or TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        shown = "" if default is None else " (default: none)" if default == "" else " (default: %(default)s)"
        kwargs = {"default": default, "help": f.metadata["help"] + shown}  # a None default is the data's: help says it
        if f.type in ("bool", "bool | None"):
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag_name(f.name), type=FLAG_TYPES[f.type], choices=f.metadata["choices"], **kwargs)


def parse_args(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=description)
    add_config_flags(parser)
    return TrainConfig(**vars(parser.parse_args(argv)))
