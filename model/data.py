"""Data sets: the embedded digits (no download), the user's own image folders, CIFAR-10 from its archive.

Every data set yields ``(pixels, label)`` with ``pixels`` a uint8 tensor (C, H, W) already in the
model's colour mode and input size, produced by the same ``Preprocessing.resized`` the exported model
records. Normalisation and augmentation happen batch-wise in the training loop, on the device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from contract import FitToContent
from model.config import TrainConfig, background
from model.preprocessing import Preprocessing

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"


class DataError(ValueError):
    """The data the user pointed at cannot be used; the message says why."""


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    labels: list[str]
    preprocessing: Preprocessing
    name: str
    flip: bool  # whether horizontal flips are a valid augmentation for this data
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable files left out, with the reason

    def counts(self) -> dict[str, tuple[int, int]]:
        """label -> (training images, validation images)."""
        train, val = targets(self.train), targets(self.val)
        return {label: (train.count(i), val.count(i)) for i, label in enumerate(self.labels)}


def targets(dataset: Dataset) -> list[int]:
    return list(dataset.targets) if isinstance(dataset, ImageFolder) else dataset.tensors[1].tolist()


def channel_stats(dataset: Dataset, limit: int = 5000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale, from at most ``limit`` training images."""
    n = min(len(dataset), limit)
    x = torch.stack([dataset[i][0] for i in range(n)]).to(torch.float64) / 255.0  # x: (n, C, H, W)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def with_stats(pre: Preprocessing, train: Dataset) -> Preprocessing:
    mean, std = channel_stats(train)
    return dataclasses.replace(pre, mean=mean, std=std)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded split that keeps each class's share in both parts."""
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    idx = np.arange(len(labels))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, stratify=labels, random_state=seed)
    return np.sort(train_idx), np.sort(val_idx)


def tensor_dataset(images: list[Image.Image], labels: np.ndarray, pre: Preprocessing) -> TensorDataset:
    pixels = torch.stack([pre.to_uint8(img) for img in images])  # pixels: (N, C, H, W) uint8
    return TensorDataset(pixels, torch.as_tensor(labels, dtype=torch.long))


def digit_images() -> tuple[list[Image.Image], np.ndarray]:
    """The 1,797 8x8 digits shipped inside scikit-learn, as 8-bit grayscale images (white ink on black)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are ink counts 0..16 (UCI optdigits); scale to the 0..255 range of an ordinary image.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return [Image.fromarray(p, "L") for p in pixels], digits.target.astype(np.int64)


def load_digits_data(image_size: int, val_fraction: float, split_seed: int, resize: str, synthetic: int = 0,
                     **fields) -> DataBundle:
    """``synthetic``: pen-drawn digits per class added to the training split only (``model.strokes``, seeded by
    ``split_seed`` so every training seed sees the same set); ``fields``: the further ``Preprocessing`` fields
    (resize_mode, crop_fraction, background, fit_to_content)."""
    images, targets = digit_images()
    train_idx, val_idx = stratified_split(targets, val_fraction, split_seed)
    pre = Preprocessing((image_size, image_size), "L", (0.0,), (1.0,), resize, **fields)
    train_images, train_targets = [images[i] for i in train_idx], targets[train_idx]
    if synthetic:
        from model.strokes import synthetic_digits

        drawn, drawn_targets = synthetic_digits(synthetic, split_seed)
        train_images, train_targets = train_images + drawn, np.concatenate([train_targets, drawn_targets])
    train = tensor_dataset(train_images, train_targets, pre)
    val = tensor_dataset([images[i] for i in val_idx], targets[val_idx], pre)
    labels = [str(d) for d in range(10)]
    return DataBundle(train, val, labels, with_stats(pre, train), "digits", flip=False)


def file_pixels(file: Path | BinaryIO, pre: Preprocessing) -> torch.Tensor:
    """One image file as the network's uint8 pixels (C, H, W), decoded as the service decodes it (``draft``)."""
    with Image.open(file) as img:
        return pre.to_uint8(pre.draft(img))


class ImageFolder(Dataset):
    """Images decoded lazily, so a folder larger than memory still trains."""

    def __init__(self, files: list[Path], targets: list[int], pre: Preprocessing) -> None:
        self.files, self.targets, self.pre = files, targets, pre

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            return file_pixels(self.files[i], self.pre), self.targets[i]
        except OSError as e:
            raise DataError(f"cannot read image {self.files[i]}: {e}") from e


def scan_classes(root: Path) -> dict[str, list[Path]]:
    """label -> its image files, one label per sub-folder (hidden ones aside); an empty class folder is an error,
    since its label would silently vanish from the model."""
    classes = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {d} holds no images ({' '.join(sorted(IMAGE_SUFFIXES))}): add images or "
                            "remove the folder")
        classes[d.name] = files
    return classes


def unreadable(files: list[Path], pre: Preprocessing) -> list[tuple[Path, str]]:
    """Every file that cannot become the network's pixels, with the reason: found before training, not an epoch in."""
    bad = []
    for f in files:
        try:
            file_pixels(f, pre)  # the whole decode, as training does it: truncated files fail only here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append((f, str(e) or type(e).__name__))
    return bad


def drop_unreadable(parts: dict[Path, dict[str, list[Path]]], pre: Preprocessing,
                    skip: bool) -> list[tuple[Path, str]]:
    """Check every image of ``parts`` (folder -> label -> files); stop with the list of unreadable ones, or drop
    them in place when ``skip``."""
    files = [f for classes in parts.values() for fs in classes.values() for f in fs]
    bad = unreadable(files, pre)
    if bad and not skip:
        listing = "\n".join(f"  {f}: {reason}" for f, reason in bad)
        raise DataError(f"{len(bad)} of {len(files)} images cannot be read; fix or remove them, or pass "
                        f"--skip-bad-images to train without them:\n{listing}")
    drop = {f for f, _ in bad}
    for folder, classes in parts.items():
        for label, fs in classes.items():
            classes[label] = [f for f in fs if f not in drop]
            if not classes[label]:
                raise DataError(f"class folder {folder / label} holds no readable images")
    return bad


def load_folder_data(
    root: Path, image_size: int, colour_mode: str, val_fraction: float, split_seed: int, resize: str, flip: bool,
    skip_bad: bool = False, **fields,
) -> DataBundle:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    pre = Preprocessing((image_size, image_size), colour_mode, (0.0,) * (3 if colour_mode == "RGB" else 1),
                        (1.0,) * (3 if colour_mode == "RGB" else 1), resize, **fields)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_classes, val_classes = scan_classes(root / "train"), scan_classes(root / "val")
        labels = sorted(train_classes)
        if not val_classes:
            raise DataError(f"{root / 'val'} holds no class folders: put validation images in {root / 'val'}/<label>/")
        if missing := sorted(set(val_classes) - set(labels)):
            raise DataError(f"val has classes that train lacks: {missing}")
        if len(labels) < 2:
            raise DataError(f"{root} needs at least 2 class folders holding images ({sorted(IMAGE_SUFFIXES)})")
        skipped = drop_unreadable({root / "train": train_classes, root / "val": val_classes}, pre, skip_bad)
        index = {c: i for i, c in enumerate(labels)}

        def flat(classes: dict[str, list[Path]]) -> tuple[list[Path], list[int]]:
            pairs = [(f, index[c]) for c in sorted(classes) for f in classes[c]]
            return [f for f, _ in pairs], [t for _, t in pairs]

        train = ImageFolder(*flat(train_classes), pre)
        val = ImageFolder(*flat(val_classes), pre)
    else:
        classes = scan_classes(root)
        labels = sorted(classes)
        if len(labels) < 2:
            raise DataError(f"{root} needs at least 2 class folders holding images ({sorted(IMAGE_SUFFIXES)})")
        skipped = drop_unreadable({root: classes}, pre, skip_bad)
        files = [f for c in labels for f in classes[c]]
        targets = np.array([i for i, c in enumerate(labels) for _ in classes[c]])
        if min(len(v) for v in classes.values()) < 2:
            raise DataError("every class needs at least 2 images to be split into train and val")
        train_idx, val_idx = stratified_split(targets, val_fraction, split_seed)
        train = ImageFolder([files[i] for i in train_idx], targets[train_idx].tolist(), pre)
        val = ImageFolder([files[i] for i in val_idx], targets[val_idx].tolist(), pre)
    return DataBundle(train, val, labels, with_stats(pre, train), root.name, flip=flip, skipped=skipped)


def summary(bundle: DataBundle) -> str:
    """The classes with their image counts per split, and the images left out."""
    counts = bundle.counts()
    width = max(5, *(len(label) for label in counts))
    train, val = sum(t for t, _ in counts.values()), sum(v for _, v in counts.values())
    lines = [f"data {bundle.name}: {len(counts)} classes, {train} training and {val} validation images",
             f"  {'class':<{width}}  train    val"]
    lines += [f"  {label:<{width}}  {t:5d}  {v:5d}" for label, (t, v) in counts.items()]
    if bundle.skipped:
        lines.append(f"skipped {len(bundle.skipped)} unreadable images (--skip-bad-images):")
        lines += [f"  {path}: {reason}" for path, reason in bundle.skipped]
    return "\n".join(lines)


def load_bundle(cfg: TrainConfig) -> DataBundle:
    """The data a config names; digits are always L and CIFAR-10 always RGB, folders take --colour-mode (RGB)."""
    if cfg.data in ("digits", "cifar10"):
        mode = "L" if cfg.data == "digits" else "RGB"
        if cfg.colour_mode not in (None, mode):
            raise DataError(f"{cfg.data} images are {mode}: drop --colour-mode {cfg.colour_mode} or pass {mode}")
    mode = {"digits": "L", "cifar10": "RGB"}.get(cfg.data, cfg.colour_mode or "RGB")
    fields = preprocessing_fields(cfg, 1 if mode == "L" else 3)
    if cfg.synthetic and cfg.data != "digits":
        raise DataError(f"--synthetic adds drawn digits to --data digits, not to {cfg.data}: drop it")
    if cfg.data == "digits":
        return load_digits_data(cfg.image_size, cfg.val_fraction, cfg.split_seed, cfg.resize, cfg.synthetic,
                                **fields)
    if cfg.data == "cifar10":
        return load_cifar10_data(Path(cfg.data_dir), cfg.image_size, cfg.resize, cfg.download, **fields)
    return load_folder_data(
        Path(cfg.data), cfg.image_size, mode, cfg.val_fraction, cfg.split_seed, cfg.resize,
        flip=True if cfg.flip is None else cfg.flip, skip_bad=cfg.skip_bad_images, **fields,
    )


def preprocessing_fields(cfg: TrainConfig, channels: int) -> dict:
    """The ``Preprocessing`` fields beyond size, colour mode and filter that the config's flags name."""
    return {"resize_mode": cfg.resize_mode or "stretch", "crop_fraction": cfg.crop_fraction,
            "background": background(cfg, channels),
            "fit_to_content": FitToContent(cfg.fit_margin, cfg.fit_threshold) if cfg.fit_to_content else None}


def download_cifar10(root: Path, url: str = CIFAR10_URL, md5: str | None = CIFAR10_MD5) -> Path:
    """Fetch and unpack the archive into ``root``; only called when the user asks (``--download``)."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=root, suffix=".tar.gz", delete=False) as tmp:
        with urllib.request.urlopen(url, timeout=60) as r:
            shutil.copyfileobj(r, tmp)
    archive = Path(tmp.name)
    try:
        if md5 is not None:
            digest = hashlib.md5(archive.read_bytes()).hexdigest()
            if digest != md5:
                raise DataError(f"downloaded archive has md5 {digest}, expected {md5}")
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, filter="data")
    finally:
        archive.unlink(missing_ok=True)
    return root / CIFAR10_DIR


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # (N, C, H, W), RGB planes
    return data, np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10_data(root: Path, image_size: int, resize: str, download: bool, url: str = CIFAR10_URL,
                      **fields) -> DataBundle:
    root = Path(root)
    folder = root if (root / "batches.meta").exists() else root / CIFAR10_DIR
    if not (folder / "batches.meta").exists():
        if not download:
            raise DataError(f"no CIFAR-10 archive under {root}; pass --download to fetch it")
        folder = download_cifar10(root, url, CIFAR10_MD5 if url == CIFAR10_URL else None)
    with open(folder / "batches.meta", "rb") as f:
        labels = [s.decode() for s in pickle.load(f, encoding="bytes")[b"label_names"]]
    parts = [read_cifar_batch(p) for p in sorted(folder.glob("data_batch_*"))]
    if not parts:
        raise DataError(f"{folder} holds no data_batch_* files")
    train_x, train_y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    val_x, val_y = read_cifar_batch(folder / "test_batch")
    pre = Preprocessing((image_size, image_size), "RGB", (0.0,) * 3, (1.0,) * 3, resize, **fields)

    def as_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        if image_size == 32 and pre.resize_mode == "stretch" and pre.fit_to_content is None:  # the pixels as they are
            return TensorDataset(torch.from_numpy(x.copy()), torch.from_numpy(y))
        images = [Image.fromarray(a.transpose(1, 2, 0), "RGB") for a in x]
        return tensor_dataset(images, y, pre)

    train = as_dataset(train_x, train_y)
    return DataBundle(train, as_dataset(val_x, val_y), labels, with_stats(pre, train), "cifar10", flip=True)
