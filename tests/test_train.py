"""Training: a short real run on digits, determinism, resume, folder data, and DDP with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from bench.harness import free_port
from model.train import TrainConfig, augment, lr_at, parse_args, train
from tests.conftest import ROOT, make_class_folder

# Native 8x8 digits and the smallest CIFAR-style net keep each run to seconds on 2 cores.
FAST = dict(data="digits", arch="resnet8", image_size=8, batch_size=64, lr=0.05, warmup_epochs=0.5, progress=False)


def test_parse_args_maps_every_flag_to_config():
    cfg = parse_args(["--arch", "resnet56", "--no-progress", "--plain", "--weight-decay", "1e-4", "--epochs", "3"])
    assert (cfg.arch, cfg.progress, cfg.plain, cfg.weight_decay, cfg.epochs) == ("resnet56", False, True, 1e-4, 3)


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


def test_train_learns_digits_and_is_deterministic(tmp_path):
    a = train(TrainConfig(**FAST, epochs=4, seed=3, out=str(tmp_path / "a")))
    b = train(TrainConfig(**FAST, epochs=4, seed=3, out=str(tmp_path / "b")))
    assert a == {**b, "seconds": a["seconds"]}
    assert a["val_accuracy"] > 0.6, a  # far above the 0.1 of chance after 4 short epochs
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    ckpt = torch.load(tmp_path / "a" / "best.pt", weights_only=False)
    assert ckpt["labels"] == [str(i) for i in range(10)] and ckpt["metrics"] == a


def test_train_resume_continues_where_it_stopped(tmp_path):
    full = train(TrainConfig(**FAST, epochs=3, seed=1, out=str(tmp_path / "full")))
    train(TrainConfig(**FAST, epochs=2, seed=1, out=str(tmp_path / "part")))
    # same schedule length as the full run: resume needs the total epochs to rebuild the lr schedule
    cfg = TrainConfig(**FAST, epochs=3, seed=1, out=str(tmp_path / "part"), resume=str(tmp_path / "part" / "last.pt"))
    state = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert state["epoch"] == 2
    resumed = train(cfg)
    log = (tmp_path / "part" / "log.jsonl").read_text().splitlines()
    assert len(log) == 3
    assert json.loads(log[-1])["epoch"] == 3
    assert resumed["epoch"] >= 1 and full["epoch"] >= 1


def test_train_on_user_folder(tmp_path):
    root = make_class_folder(tmp_path / "imgs", {"bright": 250, "dark": 10}, size=8, per_class=10)
    best = train(TrainConfig(**{**FAST, "data": str(root)}, epochs=2, out=str(tmp_path / "run")))
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert ckpt["labels"] == ["bright", "dark"] and ckpt["in_channels"] == 3
    assert 0 <= best["val_accuracy"] <= 1


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
