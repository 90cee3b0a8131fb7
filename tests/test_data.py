"""Data sets: the embedded digits, user folders, CIFAR-10 archives (written by the test), and download."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contract import to_colour_mode
from model import data
from model.config import TrainConfig
from model.preprocessing import Preprocessing
from tests.conftest import make_class_folder


def test_load_digits_split_is_stratified_fixed_and_disjoint():
    a = data.load_digits_data(32, 0.2, 0, "bilinear")
    b = data.load_digits_data(32, 0.2, 0, "bilinear")
    assert len(a.train) + len(a.val) == 1797
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert a.train[0][0].shape == (1, 32, 32) and a.train[0][0].dtype == torch.uint8
    val_counts = Counter(a.val.tensors[1].tolist())
    assert set(val_counts) == set(range(10))
    assert max(val_counts.values()) - min(val_counts.values()) <= 2
    train_rows = {t.numpy().tobytes() for t in a.train.tensors[0]}
    assert sum(t.numpy().tobytes() in train_rows for t in a.val.tensors[0]) < 5  # a few digits are duplicates
    assert a.labels == [str(i) for i in range(10)] and a.flip is False
    # mean and std of 1,437 training digits at 32x32 (bilinear): mostly black, white ink
    assert a.preprocessing.mean == pytest.approx((0.31,), abs=0.01), a.preprocessing
    assert a.preprocessing.std == pytest.approx((0.32,), abs=0.01), a.preprocessing
    assert a.counts() == {label: (int((a.train.tensors[1] == i).sum()), val_counts[i]) for i, label in
                          enumerate(a.labels)}


def test_load_folder_data_splits_by_seed(tmp_path):
    root = make_class_folder(tmp_path / "imgs", {"cat": 200, "dog": 90, "fox": 140})
    bundle = data.load_folder_data(root, 16, "RGB", 0.3, 0, "bilinear", flip=True)
    assert bundle.labels == ["cat", "dog", "fox"]
    assert len(bundle.train) + len(bundle.val) == 18
    assert sorted(Counter(bundle.val.targets).values()) == [2, 2, 2]
    assert bundle.counts() == {"cat": (4, 2), "dog": (4, 2), "fox": (4, 2)}
    x, y = bundle.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y in (0, 1, 2)


def test_load_folder_data_uses_train_val_subfolders(tmp_path):
    make_class_folder(tmp_path / "d" / "train", {"a": 50, "b": 250}, per_class=4)
    make_class_folder(tmp_path / "d" / "val", {"a": 50, "b": 250}, per_class=2)
    bundle = data.load_folder_data(tmp_path / "d", 8, "L", 0.2, 0, "bilinear", flip=False)
    assert (len(bundle.train), len(bundle.val)) == (8, 4)
    assert bundle.train[0][0].shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        pytest.param({}, "does not exist", id="missing"),
        pytest.param({"only": 3}, "at least 2 class folders", id="one-class"),
        pytest.param({"a": 1, "b": 3}, "at least 2 images", id="too-few-images"),
        pytest.param({"a": 2, "b": 2, "c": 0}, "class folder .*/d/c holds no images", id="empty-class"),
    ],
)
def test_load_folder_data_bad_layout_fails_clearly(tmp_path, layout, message):
    root = tmp_path / "d"
    for label, n in layout.items():
        make_class_folder(root, {label: 100}, per_class=n)
    with pytest.raises(data.DataError, match=message):
        data.load_folder_data(root, 8, "RGB", 0.5, 0, "bilinear", flip=False)


def test_load_folder_data_ignores_hidden_folders(tmp_path):
    root = make_class_folder(tmp_path / "d", {"a": 50, "b": 250}, per_class=4)
    (root / ".ipynb_checkpoints").mkdir()
    assert data.load_folder_data(root, 8, "L", 0.5, 0, "bilinear", flip=False).labels == ["a", "b"]


def test_load_folder_data_with_an_empty_val_split_fails(tmp_path):
    make_class_folder(tmp_path / "d" / "train", {"a": 50, "b": 250}, per_class=4)
    (tmp_path / "d" / "val").mkdir()
    with pytest.raises(data.DataError, match="val holds no class folders"):
        data.load_folder_data(tmp_path / "d", 8, "L", 0.2, 0, "bilinear", flip=False)


def break_images(root: Path) -> list[Path]:
    truncated, garbage = root / "a" / "1.png", root / "b" / "0.jpeg"
    truncated.write_bytes(truncated.read_bytes()[:-40])
    garbage.write_bytes(b"\x00" * 64)
    return [truncated, garbage]


def test_load_folder_data_lists_every_unreadable_image(tmp_path):
    root = make_class_folder(tmp_path / "d", {"a": 50, "b": 250}, per_class=4)
    bad = break_images(root)
    with pytest.raises(data.DataError) as e:
        data.load_folder_data(root, 8, "RGB", 0.5, 0, "bilinear", flip=False)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("2 of 8 images cannot be read"), lines
    assert [line.split(":")[0].strip() for line in lines[1:]] == [str(p) for p in bad], lines


def test_load_folder_data_skips_unreadable_images_when_asked(tmp_path):
    root = make_class_folder(tmp_path / "d", {"a": 50, "b": 250}, per_class=4)
    bad = break_images(root)
    bundle = data.load_folder_data(root, 8, "RGB", 0.5, 0, "bilinear", flip=False, skip_bad=True)
    assert [path for path, _ in bundle.skipped] == bad
    assert sum(t + v for t, v in bundle.counts().values()) == 6
    assert not set(bad) & set(bundle.train.files + bundle.val.files)


def test_load_folder_data_class_of_only_unreadable_images_fails(tmp_path):
    root = make_class_folder(tmp_path / "d", {"a": 50, "b": 250}, per_class=2)
    for f in (root / "b").iterdir():
        f.write_bytes(b"")
    with pytest.raises(data.DataError, match="class folder .*/d/b holds no readable images"):
        data.load_folder_data(root, 8, "RGB", 0.5, 0, "bilinear", flip=False, skip_bad=True)


@pytest.mark.parametrize(
    ("name", "mode", "message"),
    [
        pytest.param("digits", "RGB", "digits images are L: drop --colour-mode RGB or pass L", id="digits-rgb"),
        pytest.param("cifar10", "L", "cifar10 images are RGB: drop --colour-mode L or pass RGB", id="cifar-grey"),
    ],
)
def test_load_bundle_refuses_a_colour_mode_the_data_cannot_have(name, mode, message):
    with pytest.raises(data.DataError, match=message):
        data.load_bundle(TrainConfig(data=name, colour_mode=mode))


def test_load_bundle_folder_takes_the_colour_mode_asked_for(tmp_path):
    root = make_class_folder(tmp_path / "d", {"a": 50, "b": 250}, per_class=4)
    cfg = TrainConfig(data=str(root), image_size=8, val_fraction=0.5)
    assert data.load_bundle(cfg).preprocessing.colour_mode == "RGB"
    assert data.load_bundle(dataclasses.replace(cfg, colour_mode="L")).preprocessing.colour_mode == "L"


def write_cifar_archive(folder: Path, n_train: int = 20, n_test: int = 10) -> None:
    """A miniature CIFAR-10 in the real python-pickle layout."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    for name, n in [("data_batch_1", n_train), ("data_batch_2", n_train), ("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_load_cifar10_reads_pickle_archive(tmp_path):
    write_cifar_archive(tmp_path / data.CIFAR10_DIR)
    bundle = data.load_cifar10_data(tmp_path, 32, "bilinear", download=False)
    assert (len(bundle.train), len(bundle.val)) == (40, 10)
    assert bundle.labels[0] == "airplane" and bundle.flip is True
    with open(tmp_path / data.CIFAR10_DIR / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")[b"data"][0]
    assert torch.equal(bundle.train[0][0], torch.from_numpy(first.reshape(3, 32, 32)))


def test_load_cifar10_without_archive_or_flag_fails(tmp_path):
    with pytest.raises(data.DataError, match="pass --download"):
        data.load_cifar10_data(tmp_path, 32, "bilinear", download=False)


def test_download_cifar10_fetches_checks_and_unpacks(tmp_path):
    src = tmp_path / "src"
    write_cifar_archive(src / data.CIFAR10_DIR)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / data.CIFAR10_DIR, arcname=data.CIFAR10_DIR)
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "c.tar.gz").write_bytes(buf.getvalue())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "serve"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/c.tar.gz"
        folder = data.download_cifar10(tmp_path / "dl", url, hashlib.md5(buf.getvalue()).hexdigest())
        assert (folder / "test_batch").exists()
        with pytest.raises(data.DataError, match="md5"):
            data.download_cifar10(tmp_path / "dl2", url, "0" * 32)
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        pytest.param("L", lambda: Image.fromarray(np.full((4, 4), 40000, np.uint16)), id="16-bit-scaled-not-clipped"),
        pytest.param("L", lambda: Image.new("RGBA", (4, 4), (255, 255, 255, 0)), id="transparent-onto-black"),
        pytest.param("RGB", lambda: Image.new("P", (4, 4), 3), id="palette"),
    ],
)
def test_to_colour_mode_converts_special_modes(mode, make):
    img = to_colour_mode(make(), mode)
    assert img.mode == mode
    arr = np.asarray(img)
    if make().mode.startswith("I"):
        assert arr.max() == 40000 >> 8
    if make().mode == "RGBA":
        assert arr.max() == 0


def test_preprocessing_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        Preprocessing((8, 8), "RGB", (0.5,), (0.5,))
