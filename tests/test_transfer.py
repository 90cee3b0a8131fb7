"""Transfer learning in training (issue 15 item 3): --init, --pretrained imagenet from a local server, linear probes,
a lower backbone learning rate, and the flags' validation."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import pytest
import torch

from model import pretrained
from model.config import TrainConfig
from model.resnet import build
from model.train import main, train
from tests.conftest import make_class_folder

IMAGENET = pretrained.IMAGENET_PREPROCESSING


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of 32 x 32 RGB images, 6 each."""
    return make_class_folder(tmp_path_factory.mktemp("photos"), {"cat": 200, "dog": 60}, size=32, per_class=6)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A torchvision-layout resnet18 state dict (1000-class head) whose backbone no run would draw by itself."""
    torch.manual_seed(123)
    state = build("resnet18", num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18-imagenet.pth"
    torch.save(state, path)
    return path, state


def config(folder, tmp_path, **kwargs) -> TrainConfig:
    base = dict(data=str(folder), arch="resnet18", image_size=32, epochs=1, batch_size=4, progress=False,
                out=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kwargs})


def trained(tmp_path) -> dict:
    return torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]


def backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not pretrained.is_head(k)}


def assert_same_backbone(got: dict, want: dict) -> None:
    mismatched = [k for k, v in backbone(want).items() if not torch.equal(got[k], v)]
    assert not mismatched, f"{len(mismatched)} backbone tensors changed, the first {mismatched[:3]}"


# --- --init PATH ----------------------------------------------------------------------------------------------------


def test_train_with_init_loads_backbone_and_sizes_head_for_the_folder(folder, weights, tmp_path):
    path, state = weights
    fresh = build("resnet18", num_classes=2).state_dict()
    assert not torch.equal(fresh["conv1.weight"], state["conv1.weight"])  # else the test proves nothing
    # lr 0 (warm-up included): the parameters stay as loaded, so they can be compared exactly
    train(config(folder, tmp_path, init=str(path), lr=0.0, warmup_lr=0.0))
    got = trained(tmp_path)
    params = {name for name, _ in build("resnet18", num_classes=2).named_parameters()}
    mismatched = [k for k in params if not pretrained.is_head(k) and not torch.equal(got[k], state[k])]
    assert not mismatched, f"not loaded from --init: {mismatched[:3]}"
    assert got["fc.weight"].shape == (2, 512) and got["fc.bias"].shape == (2,)
    pre = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["preprocessing"]
    assert (pre["mean"], pre["std"]) == (IMAGENET["mean"], IMAGENET["std"]), pre  # torchvision weights: ImageNet's
    assert (pre["resize_mode"], pre["crop_fraction"]) == (IMAGENET["resize_mode"], IMAGENET["crop_fraction"]), pre


def test_train_freeze_backbone_leaves_backbone_bit_identical_and_trains_head(folder, weights, tmp_path):
    path, state = weights
    train(config(folder, tmp_path / "still", init=str(path), lr=0.0, warmup_lr=0.0))
    head_before = trained(tmp_path / "still")["fc.weight"]
    train(config(folder, tmp_path, init=str(path), freeze_backbone=True, lr=0.1, warmup_epochs=0.0))
    got = trained(tmp_path)
    assert_same_backbone(got, state)  # parameters and BN statistics alike
    assert not torch.equal(got["fc.weight"], head_before)  # the head did train (same seed, same initial head)


def test_train_backbone_lr_scale_slows_only_the_backbone(folder, weights, tmp_path):
    path, state = weights

    def moved(scale: float, out) -> tuple[float, float]:
        train(config(folder, out, init=str(path), backbone_lr_scale=scale, lr=0.1, warmup_epochs=0.0))
        got = trained(out)
        return (float((got["layer1.0.conv1.weight"] - state["layer1.0.conv1.weight"]).abs().max()),
                float(got["fc.weight"].abs().sum()))

    full_backbone, full_head = moved(1.0, tmp_path / "full")
    slow_backbone, slow_head = moved(1e-4, tmp_path / "slow")
    assert full_backbone > 1e-3, full_backbone
    # SGD's first steps move a parameter in proportion to its learning rate
    assert slow_backbone < full_backbone * 1e-3, (slow_backbone, full_backbone)
    assert slow_head > 0


# --- --pretrained imagenet, from a local server -----------------------------------------------------------------------


@pytest.fixture
def weights_server(weights, monkeypatch, tmp_path):
    """torchvision's download site, served from a folder holding the fake resnet18 file; torch.hub's cache in tmp."""
    path, _ = weights
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(path.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
    try:
        yield url, hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    finally:
        server.shutdown()
        server.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_train_pretrained_imagenet_fetches_checks_and_records_imagenet_stats(folder, weights, weights_server,
                                                                             monkeypatch, tmp_path):
    url, sha = weights_server
    monkeypatch.setitem(pretrained.IMAGENET_WEIGHTS, "resnet18", (url, sha))
    train(config(folder, tmp_path, pretrained="imagenet", freeze_backbone=True))
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert_same_backbone(ckpt["model"], weights[1])
    pre = ckpt["preprocessing"]
    assert (pre["mean"], pre["std"], pre["colour_mode"]) == (IMAGENET["mean"], IMAGENET["std"], "RGB"), pre
    assert (pre["resize_mode"], pre["crop_fraction"]) == (IMAGENET["resize_mode"], IMAGENET["crop_fraction"]), pre
    assert (tmp_path / "torch-home" / "hub" / "checkpoints" / weights[0].name).is_file()


def test_train_pretrained_imagenet_wrong_hash_is_refused(folder, weights_server, monkeypatch, tmp_path, capsys):
    url, sha = weights_server
    wrong = "0" * 8 if sha != "0" * 8 else "1" * 8
    monkeypatch.setitem(pretrained.IMAGENET_WEIGHTS, "resnet18", (url, wrong))
    with pytest.raises(SystemExit) as e:
        main(["--data", str(folder), "--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--no-progress",
              "--pretrained", "imagenet", "--out", str(tmp_path / "run")])
    assert f"expected {wrong}...; the download was removed" in str(e.value), e.value
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert not list((tmp_path / "torch-home" / "hub" / "checkpoints").iterdir())
    assert not (tmp_path / "run" / "best.pt").exists()


# --- validation of the flags -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(["--init", "w.pth", "--pretrained", "imagenet"],
                     "--init and --pretrained both name starting weights: pass one of them", id="init-and-pretrained"),
        pytest.param(["--arch", "resnet20", "--pretrained", "imagenet"],
                     "--pretrained imagenet needs --arch resnet18 or resnet34 or resnet50, got resnet20",
                     id="pretrained-cifar-arch"),
        pytest.param(["--colour-mode", "L", "--pretrained", "imagenet"],
                     "--pretrained imagenet weights read RGB images: drop --colour-mode L", id="pretrained-grayscale"),
        pytest.param(["--freeze-backbone"],
                     "--freeze-backbone needs starting weights: pass --init PATH or --pretrained imagenet",
                     id="freeze-without-weights"),
        pytest.param(["--init", "w.pth", "--backbone-lr-scale", "0"],
                     "--backbone-lr-scale must be positive, got 0.0 (--freeze-backbone trains no backbone at all)",
                     id="zero-lr-scale"),
        pytest.param(["--init", "w.pth", "--freeze-backbone", "--backbone-lr-scale", "0.1"],
                     "--backbone-lr-scale has no effect with --freeze-backbone: pass one of them",
                     id="freeze-and-lr-scale"),
        pytest.param(["--backbone-lr-scale", "0.1"],
                     "--backbone-lr-scale needs starting weights: pass --init PATH or --pretrained imagenet",
                     id="lr-scale-without-weights"),
    ],
)
def test_train_transfer_flags_refused_with_one_line(tmp_path, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path), "--arch", "resnet18", "--out", str(tmp_path / "run"), *flags])
    assert str(e.value) == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_train_pretrained_on_grayscale_digits_is_refused(tmp_path, weights_server):
    with pytest.raises(SystemExit) as e:
        main(["--data", "digits", "--arch", "resnet18", "--pretrained", "imagenet", "--out", str(tmp_path / "run")])
    assert str(e.value) == "error: --pretrained imagenet weights read RGB images, and digits is L"
