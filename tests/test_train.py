"""Training: a short real run on digits, determinism, resume, folder data, DDP with gloo, and the command line a new
user meets (help, bad images, empty classes, small folders, the install target and docs/training.md)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.harness import free_port
from model.config import ConfigError, TrainConfig, parse_args, resolved, validate
from model.data import DataError, load_bundle, load_digits_data
from model.engine import Distortion, augment, distort, lr_at, reink, thicken
from model.train import MIN_STEPS_PER_EPOCH, few_steps_warning, train
from tests.conftest import ROOT, make_class_folder

# Native 8x8 digits and the smallest CIFAR-style net keep each run to seconds on 2 cores.
FAST = dict(data="digits", arch="resnet8", image_size=8, batch_size=64, lr=0.05, warmup_epochs=0.5, progress=False)
FAST_FLAGS = ["--arch", "resnet8", "--image-size", "8", "--epochs", "1", "--no-progress", "--device", "cpu"]


def run_train(*flags: str) -> subprocess.CompletedProcess:
    """``python -m model.train`` as a user runs it."""
    cmd = [sys.executable, "-m", "model.train", *flags]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


def test_parse_args_maps_every_flag_to_config():
    cfg = parse_args(["--arch", "resnet56", "--no-progress", "--plain", "--weight-decay", "1e-4", "--epochs", "3",
                      "--colour-mode", "L", "--skip-bad-images"])
    assert (cfg.arch, cfg.progress, cfg.plain, cfg.weight_decay, cfg.epochs) == ("resnet56", False, True, 1e-4, 3)
    assert (cfg.colour_mode, cfg.skip_bad_images) == ("L", True)


def test_parse_args_maps_the_preprocessing_flags_to_config():
    cfg = parse_args(["--resize-mode", "shorter-side-crop", "--crop-fraction", "0.9", "--background", "255,255,255",
                      "--fit-to-content", "--fit-margin", "0.2", "--fit-threshold", "16"])
    assert (cfg.resize_mode, cfg.crop_fraction, cfg.background) == ("shorter-side-crop", 0.9, "255,255,255")
    assert (cfg.fit_to_content, cfg.fit_margin, cfg.fit_threshold) == (True, 0.2, 16)


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        pytest.param({}, ("A", "stretch", None), id="from-scratch-stretches"),
        pytest.param({"init": "w.pth"}, ("B", "shorter-side-crop", 0.875), id="init-crops-as-imagenet"),
        pytest.param({"pretrained": "imagenet"}, ("B", "shorter-side-crop", 0.875), id="pretrained-crops"),
        pytest.param({"init": "w.pth", "resize_mode": "pad"}, ("B", "pad", None), id="init-as-asked"),
        pytest.param({"resize_mode": "shorter-side-crop", "crop_fraction": 0.5}, ("A", "shorter-side-crop", 0.5),
                     id="crop-as-asked"),
    ],
)
def test_resolved_records_the_preprocessing_starting_weights_were_evaluated_with(flags, want):
    cfg = resolved(TrainConfig(**flags))
    assert (cfg.shortcut, cfg.resize_mode, cfg.crop_fraction) == want


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param({"crop_fraction": 0.9}, "--crop-fraction applies to --resize-mode shorter-side-crop, and the "
                     "run's is stretch", id="crop-fraction-when-stretching"),
        pytest.param({"fit_margin": 0.3}, "--fit-margin and --fit-threshold need --fit-to-content", id="fit-margin"),
        pytest.param({"background": "white"}, "--background 'white': give one 0..255 value, or 3 comma-separated",
                     id="background-name"),
        pytest.param({"background": "0,0,300"}, "give one 0..255 value", id="background-above-255"),
    ],
)
def test_validate_refuses_preprocessing_flags_that_do_nothing_or_cannot_be(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(TrainConfig(**flags))


def test_train_records_the_preprocessing_flags_in_the_checkpoint(tmp_path):
    root = make_class_folder(tmp_path / "photos", {"a": 40, "b": 220}, per_class=6)
    train(TrainConfig(data=str(root), arch="resnet8", image_size=8, epochs=1, batch_size=4, progress=False,
                      out=str(tmp_path / "run"), resize_mode="pad", background="255", fit_to_content=True,
                      fit_margin=0.2))
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    pre = ckpt["preprocessing"]
    assert (pre["resize_mode"], pre["crop_fraction"], pre["background"]) == ("pad", None, [255, 255, 255]), pre
    assert pre["fit_to_content"] == {"margin": 0.2, "threshold": 32}
    assert ckpt["config"]["resize_mode"] == "pad"


def test_help_documents_every_flag_with_its_default_and_choices():
    r = subprocess.run([sys.executable, "-m", "model.train", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    text = " ".join(re.sub(r"-\n\s+", "-", r.stdout).split())  # argparse wraps lines, after hyphens too
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert f.metadata["help"] in text, flag
        default = getattr(TrainConfig(), f.name)
        if default is not None:
            shown = "none" if default == "" else default
            assert f"{f.metadata['help']} (default: {shown})" in text, flag
        if f.metadata["choices"]:
            assert f"{flag} {{{','.join(f.metadata['choices'])}}}" in text, flag


def test_lr_warms_up_then_decays():
    cfg = TrainConfig(lr=0.1, warmup_lr=0.01, warmup_epochs=1, schedule="step")
    lrs = [lr_at(cfg, s, 100, 10) for s in range(100)]
    assert lrs[0] == 0.01 and abs(lrs[10] - 0.1) < 1e-12
    assert abs(lrs[99] - 0.001) < 1e-12 and max(lrs) <= 0.1


def test_augment_shifts_within_padding_and_keeps_shape():
    x = torch.zeros(16, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    out = augment(x, 2, False, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    ys, xs = torch.nonzero(out[:, 0] == 1.0, as_tuple=True)[1:]
    assert ys.min() >= 2 and ys.max() <= 6 and xs.min() >= 2 and xs.max() <= 6
    assert len(set(zip(ys.tolist(), xs.tolist(), strict=False))) > 1  # really random, not a fixed offset


def test_augment_moves_uint8_pixels_as_it_moves_floats():
    pixels = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    as_uint8 = augment(pixels, 2, True, torch.Generator().manual_seed(5))
    as_float = augment(pixels.float(), 2, True, torch.Generator().manual_seed(5))
    assert as_uint8.dtype == torch.uint8 and torch.equal(as_uint8.float(), as_float)


def test_distort_is_identity_when_every_range_is_zero():
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    out = distort(x, Distortion(), torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.allclose(out, x.float(), atol=1e-3), (out - x.float()).abs().max()


def test_distort_rotates_a_bar_by_at_most_its_limit():
    x = torch.zeros(64, 1, 33, 33)
    x[:, :, 4:29, 16] = 255.0  # a vertical bar through the centre
    out = distort(x, Distortion(rotate=30), torch.Generator().manual_seed(0))
    ys, xs = torch.meshgrid(torch.arange(33.0) - 16, torch.arange(33.0) - 16, indexing="ij")
    w = out[:, 0] / out[:, 0].sum((1, 2), keepdim=True)
    # the bar's direction from its second moments: 0 degrees is upright
    sxx, syy, sxy = (w * xs * xs).sum((1, 2)), (w * ys * ys).sum((1, 2)), (w * xs * ys).sum((1, 2))
    degrees = torch.rad2deg(0.5 * torch.atan2(2 * sxy, syy - sxx)).abs()
    assert degrees.max() <= 31 and degrees.max() > 15, degrees  # within the limit, and really turned
    assert torch.allclose(out.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.05), "the bar lost ink"


def test_distort_is_the_same_for_the_same_seed_and_differs_between_images():
    x = torch.rand(8, 1, 16, 16) * 255
    d = Distortion(zoom=0.2, stretch=0.1, rotate=10, shear=10, translate=0.1, thickness=1)
    a = distort(x, d, torch.Generator().manual_seed(7))
    b = distort(x, d, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    same = distort(x[:1].repeat(8, 1, 1, 1), d, torch.Generator().manual_seed(7))
    assert not torch.allclose(same[0], same[1]), "every image of the batch got the same distortion"


def test_thicken_grows_and_thins_strokes_per_image():
    x = torch.zeros(3, 1, 9, 9)
    x[:, :, 2:7, 3:6] = 1.0  # a 3-pixel-wide stroke
    out = thicken(x, torch.tensor([1, 0, -1]))
    assert out[0].sum() == 7 * 5 and torch.equal(out[1], x[1]) and out[2].sum() == 3 * 1, out.sum((1, 2, 3))


def test_reink_turns_a_blur_into_a_crisp_stroke_only_where_chosen():
    ramp = torch.linspace(0, 255, 256).repeat(2, 1, 1, 1)  # (2, 1, 1, 256): black to white
    out = reink(ramp, torch.tensor([True, False]), torch.tensor([128.0, 128.0]))
    crisp = out[0, 0, 0]
    assert crisp[:100].max() == 0 and crisp[156:].min() == 255, crisp  # black and white but for 24 levels about 128
    assert torch.equal(out[1], ramp[1]), "an image not chosen was changed"


def test_train_with_distortion_is_deterministic(tmp_path):
    flags = dict(zoom=0.1, stretch=0.2, rotate=10, shear=15, translate=0.05, thickness=1, ink=0.5)
    a = train(TrainConfig(**FAST, **flags, epochs=2, seed=3, out=str(tmp_path / "a")))
    b = train(TrainConfig(**FAST, **flags, epochs=2, seed=3, out=str(tmp_path / "b")))
    assert a == {**b, "seconds": a["seconds"]}


def test_synthetic_digits_join_training_split_only_and_repeat_with_split_seed():
    plain = load_digits_data(8, 0.2, 0, "bilinear")
    a = load_digits_data(8, 0.2, 0, "bilinear", synthetic=3)
    b = load_digits_data(8, 0.2, 0, "bilinear", synthetic=3)
    assert len(a.train) == len(plain.train) + 30 and len(a.val) == len(plain.val), (len(a.train), len(a.val))
    assert torch.equal(a.val.tensors[0], plain.val.tensors[0]), "synthetic digits leaked into validation"
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    added = a.train.tensors[1][len(plain.train):]
    assert added.tolist() == [d for d in range(10) for _ in range(3)], added
    other = load_digits_data(8, 0.2, 1, "bilinear", synthetic=3)
    assert not torch.equal(a.train.tensors[0][-30:], other.train.tensors[0][-30:]), "the split seed changed nothing"


def test_synthetic_refused_for_other_data(tmp_path):
    folder = make_class_folder(tmp_path / "data", {"a": 40, "b": 200})
    with pytest.raises(DataError, match="--synthetic adds drawn digits to --data digits"):
        load_bundle(TrainConfig(data=str(folder), synthetic=5))


def test_train_learns_digits_and_is_deterministic(tmp_path):
    a = train(TrainConfig(**FAST, epochs=4, seed=3, out=str(tmp_path / "a")))
    b = train(TrainConfig(**FAST, epochs=4, seed=3, out=str(tmp_path / "b")))
    assert a == {**b, "seconds": a["seconds"]}
    assert a["val_accuracy"] > 0.6, a  # far above the 0.1 of chance after 4 short epochs
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    ckpt = torch.load(tmp_path / "a" / "best.pt", weights_only=False)
    assert ckpt["labels"] == [str(i) for i in range(10)] and ckpt["metrics"] == a


def test_train_records_the_colour_mode_and_flips_it_used(tmp_path):
    train(TrainConfig(**FAST, epochs=1, out=str(tmp_path / "run")))
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert ckpt["config"]["colour_mode"] == ckpt["preprocessing"]["colour_mode"] == "L"
    assert ckpt["config"]["flip"] is False
    assert json.loads((tmp_path / "run" / "config.json").read_text())["colour_mode"] == "L"


class Interrupted(Exception):
    pass


def test_train_resume_matches_the_uninterrupted_run(tmp_path):
    full = train(TrainConfig(**FAST, epochs=3, seed=1, out=str(tmp_path / "full")))

    def stop_after_two(record: dict, model: torch.nn.Module) -> None:
        if record["epoch"] == 2:
            raise Interrupted  # as if the process were killed once epoch 2's checkpoints are written

    with pytest.raises(Interrupted):
        train(TrainConfig(**FAST, epochs=3, seed=1, out=str(tmp_path / "part")), on_epoch=stop_after_two)
    resumed = train(TrainConfig(**FAST, epochs=3, seed=1, out=str(tmp_path / "part"),
                                resume=str(tmp_path / "part" / "last.pt")))

    def without_seconds(run: str) -> list[dict]:
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert without_seconds("part") == without_seconds("full")
    assert {**resumed, "seconds": 0} == {**full, "seconds": 0}
    want = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["model"]
    got = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed weights differ from the uninterrupted run's"


def test_train_on_user_folder(tmp_path):
    root = make_class_folder(tmp_path / "imgs", {"bright": 250, "dark": 10}, size=8, per_class=10)
    best = train(TrainConfig(**{**FAST, "data": str(root), "batch_size": 4}, epochs=3, out=str(tmp_path / "run")))
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert ckpt["labels"] == ["bright", "dark"] and ckpt["in_channels"] == 3
    assert (ckpt["config"]["colour_mode"], ckpt["config"]["flip"]) == ("RGB", True)
    assert best["val_accuracy"] == 1.0, best  # the two classes differ in brightness: nothing to get wrong
    assert ckpt["parity_images"].shape == (4, 3, 8, 8) and ckpt["parity_images"].dtype == torch.uint8


def test_torchrun_two_processes_gloo_runs_one_epoch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()  # not --master_port=0: torchrun hangs with it on hosts without a resolvable name
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={port}", "-m", "model.train",
        "--arch", "resnet8", "--image-size", "8", "--epochs", "1", "--batch-size", "64", "--no-progress",
        "--device", "cpu", "--out", str(tmp_path / "ddp"),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len(log) == 1  # only rank 0 writes
    record = json.loads(log[0])
    assert 0 < record["train_loss"] < 10
    assert (tmp_path / "ddp" / "best.pt").exists()


def write_bad_images(root: Path) -> list[Path]:
    """A truncated PNG and a text file named .jpg: both fail only when decoded."""
    good = root / "bright" / "1.png"
    truncated = root / "bright" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-40])
    garbage = root / "dark" / "notes.jpg"
    garbage.write_text("not an image")
    return [truncated, garbage]


def test_train_lists_every_unreadable_image_at_once(tmp_path):
    root = make_class_folder(tmp_path / "imgs", {"bright": 250, "dark": 10}, size=8, per_class=6)
    bad = write_bad_images(root)
    r = run_train("--data", str(root), *FAST_FLAGS, "--out", str(tmp_path / "run"))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert "2 of 14 images cannot be read" in r.stderr and "--skip-bad-images" in r.stderr, r.stderr
    assert all(str(path) in r.stderr for path in bad), r.stderr
    assert not (tmp_path / "run" / "log.jsonl").exists()  # stopped before training, not an epoch in


def test_train_skip_bad_images_counts_them_and_prints_classes_per_split(tmp_path):
    root = make_class_folder(tmp_path / "imgs", {"bright": 250, "dark": 10}, size=8, per_class=10)
    bad = write_bad_images(root)
    r = run_train("--data", str(root), *FAST_FLAGS, "--batch-size", "4", "--skip-bad-images", "--out",
                  str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[:4] == ["data imgs: 2 classes, 16 training and 4 validation images",
                         "  class   train    val",
                         "  bright      8      2",
                         "  dark        8      2"], r.stdout
    assert lines[4] == "skipped 2 unreadable images (--skip-bad-images):", r.stdout
    assert {line.split(":")[0].strip() for line in lines[5:7]} == {str(p) for p in bad}, r.stdout
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert ckpt["skipped_images"] == 2


def test_train_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_class_folder(tmp_path / "imgs", {"bright": 250, "dark": 10}, size=8, per_class=6)
    (root / "fox").mkdir()
    r = run_train("--data", str(root), *FAST_FLAGS, "--out", str(tmp_path / "run"))
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(f"error: class folder {root / 'fox'} holds no images"), r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_train_small_folder_warns_what_to_change(tmp_path):
    # issue 16's case: 78 images at the default batch size of 128 are one SGD step an epoch
    root = make_class_folder(tmp_path / "imgs", {"a": 250, "b": 10, "c": 120}, size=8, per_class=26)
    r = run_train("--data", str(root), *FAST_FLAGS, "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("warning: 62 training images at --batch-size 128 make 1 SGD step(s) per epoch, 1 in all: too few to "
            "learn from. Pass --batch-size 8 (7 steps per epoch)") in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("images", "batch_size", "steps", "warned"),
    [
        pytest.param(1437, 128, 11, False, id="digits-default"),
        pytest.param(62, 128, 1, True, id="batch-above-the-data"),
        pytest.param(62, 16, MIN_STEPS_PER_EPOCH - 1, True, id="just-below"),
        pytest.param(62, 8, MIN_STEPS_PER_EPOCH, False, id="at-the-minimum"),
    ],
)
def test_few_steps_warning_only_below_the_minimum(images, batch_size, steps, warned):
    assert (few_steps_warning(TrainConfig(batch_size=batch_size), images, steps) is not None) == warned


def test_few_steps_warning_asks_for_images_when_no_batch_size_helps():
    warning = few_steps_warning(TrainConfig(), 6, 1)
    assert warning is not None and "Add images" in warning


def test_make_install_train_installs_the_train_extra(tmp_path):
    venv = tmp_path / "venv"
    r = subprocess.run(["make", "-n", "install-train", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"{venv}/bin/python -m pip install --quiet -e '.[cpu,train]'" in r.stdout, r.stdout
    assert f"touch {venv}/.train {venv}/.serve" in r.stdout, r.stdout


def doc_commands() -> list[str]:
    """The shell lines of docs/training.md's code blocks, comments dropped."""
    text = (ROOT / "docs" / "training.md").read_text()
    blocks = re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_training_doc_installs_first_then_trains_then_exports():
    commands = doc_commands()
    assert commands[0] == "make install-train", commands
    first = {kind: next(i for i, c in enumerate(commands) if f"-m model.{kind}" in c) for kind in ("train", "export")}
    assert 0 < first["train"] < first["export"], commands


def test_training_doc_commands_parse():
    """Every command the page gives runs as pasted: make targets exist, flags exist and take the values shown."""
    from model.export import parse_args as export_args

    checked = 0
    for command in doc_commands():
        words = shlex.split(command)
        while words and "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]  # VAR=value prefixes
        if words[0] == "make":
            r = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (command, r.stderr)
        elif "--help" in words:
            continue  # test_help_documents_every_flag_with_its_default_and_choices runs it
        elif "model.train" in words:
            parse_args(words[words.index("model.train") + 1:])
        elif "model.export" in words:
            export_args(words[words.index("model.export") + 1:])
        else:
            continue
        checked += 1
    assert checked >= 5, doc_commands()
