"""Data sets: the embedded digits (no download), the user's own image folders, CIFAR-10 from its archive.

Every data set yields ``(pixels, label)`` with ``pixels`` a uint8 tensor (C, H, W) already in the
model's colour mode and input size, produced by the same ``Preprocessing.resized`` the exported model
records. Normalisation and augmentation happen batch-wise in the training loop, on the device.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

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


def channel_stats(dataset: Dataset, limit: int = 5000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale, from at most ``limit`` training images."""
    n = min(len(dataset), limit)
    x = torch.stack([dataset[i][0] for i in range(n)]).to(torch.float64) / 255.0  # x: (n, C, H, W)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def with_stats(pre: Preprocessing, train: Dataset) -> Preprocessing:
    mean, std = channel_stats(train)
    return Preprocessing(pre.input_size, pre.colour_mode, mean, std, pre.resize)


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


# --- the embedded default: scikit-learn's handwritten digits ------------------------------------


def digit_images() -> tuple[list[Image.Image], np.ndarray]:
    """The 1,797 8x8 digits shipped inside scikit-learn, as 8-bit grayscale images (white ink on black)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are ink counts 0..16 (UCI optdigits); scale to the 0..255 range of an ordinary image.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return [Image.fromarray(p, "L") for p in pixels], digits.target.astype(np.int64)


def load_digits_data(image_size: int, val_fraction: float, split_seed: int, resize: str) -> DataBundle:
    images, targets = digit_images()
    train_idx, val_idx = stratified_split(targets, val_fraction, split_seed)
    pre = Preprocessing((image_size, image_size), "L", (0.0,), (1.0,), resize)
    train = tensor_dataset([images[i] for i in train_idx], targets[train_idx], pre)
    val = tensor_dataset([images[i] for i in val_idx], targets[val_idx], pre)
    labels = [str(d) for d in range(10)]
    return DataBundle(train, val, labels, with_stats(pre, train), "digits", flip=False)


# --- the user's own images: root/<label>/*.png, optionally under root/train and root/val ---------


class ImageFolder(Dataset):
    """Images decoded lazily, so a folder larger than memory still trains."""

    def __init__(self, files: list[Path], targets: list[int], pre: Preprocessing) -> None:
        self.files, self.targets, self.pre = files, targets, pre

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            with Image.open(self.files[i]) as img:
                return self.pre.to_uint8(img), self.targets[i]
        except OSError as e:
            raise DataError(f"cannot read image {self.files[i]}: {e}") from e


def scan_classes(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[d.name] = files
    return classes


def load_folder_data(
    root: Path, image_size: int, colour_mode: str, val_fraction: float, split_seed: int, resize: str, flip: bool
) -> DataBundle:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    pre = Preprocessing((image_size, image_size), colour_mode, (0.0,) * (3 if colour_mode == "RGB" else 1),
                        (1.0,) * (3 if colour_mode == "RGB" else 1), resize)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_classes, val_classes = scan_classes(root / "train"), scan_classes(root / "val")
        labels = sorted(train_classes)
        if missing := sorted(set(val_classes) - set(labels)):
            raise DataError(f"val has classes that train lacks: {missing}")
        index = {c: i for i, c in enumerate(labels)}

        def flat(classes: dict[str, list[Path]]) -> tuple[list[Path], list[int]]:
            pairs = [(f, index[c]) for c in sorted(classes) for f in classes[c]]
            return [f for f, _ in pairs], [t for _, t in pairs]

        train = ImageFolder(*flat(train_classes), pre)
        val = ImageFolder(*flat(val_classes), pre)
    else:
        classes = scan_classes(root)
        labels = sorted(classes)
        files = [f for c in labels for f in classes[c]]
        targets = np.array([i for i, c in enumerate(labels) for _ in classes[c]])
        if len(labels) >= 2 and min(len(v) for v in classes.values()) < 2:
            raise DataError("every class needs at least 2 images to be split into train and val")
        if len(labels) >= 2:
            train_idx, val_idx = stratified_split(targets, val_fraction, split_seed)
            train = ImageFolder([files[i] for i in train_idx], targets[train_idx].tolist(), pre)
            val = ImageFolder([files[i] for i in val_idx], targets[val_idx].tolist(), pre)
    if len(labels) < 2:
        raise DataError(f"{root} needs at least 2 class folders holding images ({sorted(IMAGE_SUFFIXES)})")
    return DataBundle(train, val, labels, with_stats(pre, train), root.name, flip=flip)


# --- CIFAR-10 from the standard python-pickle archive --------------------------------------------


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


def load_cifar10_data(root: Path, image_size: int, resize: str, download: bool, url: str = CIFAR10_URL) -> DataBundle:
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
    pre = Preprocessing((image_size, image_size), "RGB", (0.0,) * 3, (1.0,) * 3, resize)

    def as_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        if image_size == 32:
            return TensorDataset(torch.from_numpy(x.copy()), torch.from_numpy(y))
        images = [Image.fromarray(a.transpose(1, 2, 0), "RGB") for a in x]
        return tensor_dataset(images, y, pre)

    train = as_dataset(train_x, train_y)
    return DataBundle(train, as_dataset(val_x, val_y), labels, with_stats(pre, train), "cifar10", flip=True)
