"""The degradation experiment: the --quick pipeline end to end, its arguments, and the identity measurement."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest
import torch
from PIL import Image

from model.experiment import branch_ratios, parse_args
from model.resnet import BasicBlock, ResNet, cifar_resnet
from tests.conftest import ROOT

# What --quick trains: plain and residual at depths 8 and 14, the residual nets again without weight decay, and
# option B at the shallower depth; 2 seeds, 2 epochs.
QUICK_NETS = {"plain-8", "plain-14", "resnet-8", "resnet-14", "resnet-8-nowd", "resnet-14-nowd", "resnet-8-B"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "run"
    cmd = [sys.executable, "-m", "model.experiment", "degradation", "--quick", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_quick_run_prints_its_run_directory_and_writes_outputs(quick_run):
    out, stdout = quick_run
    assert f"run directory: {out}" in stdout.splitlines()[0]
    for name in ("results.json", "results.md", "degradation.png", "identity.png"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.pt"))  # checkpoints are dropped unless --keep-checkpoints


def test_quick_run_json_holds_every_curve_and_summary(quick_run):
    out = quick_run[0]
    results = json.loads((out / "results.json").read_text())
    assert set(results["nets"]) == QUICK_NETS
    assert results["seeds"] == [0, 1] and results["depths"] == [8, 14] and results["recipe"]["epochs"] == 2
    assert set(results["verdict"]) >= {"plain_deeper_worse", "resnet_deeper_worse", "degradation_observed"}
    for name, net in results["nets"].items():
        assert set(net["seeds"]) == {"0", "1"}, name
        for seed, run in net["seeds"].items():
            lines = (out / "nets" / f"{name}-s{seed}" / "log.jsonl").read_text().splitlines()
            log = [json.loads(line) for line in lines]
            # the curves are the training log's, epoch by epoch
            assert run["val_error"] == [1 - r["val_accuracy"] for r in log], (name, seed)
            assert run["train_error_augmented"] == [r["train_error"] for r in log], (name, seed)
            assert len(run["train_error"]) == 2, (name, seed)
            blocks = 3 * (net["depth"] - 2) // 6
            assert len(run.get("branch_ratios", [0] * blocks)) == blocks, name
            assert ("branch_ratios" in run) == net["residual"], name
        finals = [r["train_error"][-1] for r in net["seeds"].values()]
        assert net["final"]["train_error"] == pytest.approx({"mean": statistics.fmean(finals),
                                                             "std": statistics.stdev(finals)}), name
    params = {name: net["params"] for name, net in results["nets"].items()}
    assert params["plain-8"] == params["resnet-8"] < params["resnet-8-B"]  # option A adds no parameters


def test_quick_run_figures_are_readable_pngs(quick_run):
    for name in ("degradation.png", "identity.png"):
        with Image.open(quick_run[0] / name) as img:
            img.load()
            assert img.format == "PNG" and img.width > 300 and img.height > 200, name


def test_quick_run_markdown_has_a_row_per_net(quick_run):
    rows = [line for line in (quick_run[0] / "results.md").read_text().splitlines() if line.startswith("| ")]
    names = {row.split("|")[1].strip() for row in rows}
    assert QUICK_NETS <= names
    degradation_rows = [row for row in rows if row.count("|") == 8 and "±" in row]
    assert len(degradation_rows) == len(QUICK_NETS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--depths", "20"], "at least two distinct depths", id="one-depth"),
        pytest.param(["--depths", "20", "21"], "6n+2", id="bad-depth"),
        pytest.param(["--seeds", "0"], "--seeds must be at least 1", id="no-seeds"),
        pytest.param(["--shortcut-depth", "30"], "--shortcut-depth must be 0 or a depth 6n+2", id="bad-shortcut"),
    ],
)
def test_parse_args_rejects_invalid_experiment(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["degradation", *argv])
    assert message in capsys.readouterr().err


def test_parse_args_quick_keeps_explicit_flags():
    args, base = parse_args(["degradation", "--quick", "--seeds", "1", "--lr", "0.1"])
    assert (args.depths, args.seeds, base.epochs, base.image_size, base.lr) == ([8, 14], 1, 2, 8, 0.1)


def constant_branch(block: BasicBlock, value: float) -> None:
    """Make F(a) = ``value`` everywhere: the branch's last BN outputs its bias alone."""
    torch.nn.init.zeros_(block.bn2.weight)
    torch.nn.init.constant_(block.bn2.bias, value)


def test_branch_ratios_is_zero_for_zeroed_blocks():
    model = cifar_resnet(14)
    for block in model.blocks():
        constant_branch(block, 0.0)
    batches = [(torch.randn(8, 3, 8, 8), torch.zeros(8))]
    assert branch_ratios(model, batches, lambda x: x, torch.device("cpu")) == [0.0] * 6


def test_branch_ratios_matches_known_branch_and_removes_its_hooks():
    # Two stages of one block, no stem: a = 2 everywhere (4 x 4 x 4) enters block 1, whose F(a) = 1 gives
    # 1 * sqrt(64) / (2 * sqrt(64)) = 0.5; block 1 outputs 3 everywhere. Block 2 halves H, W and doubles the
    # channels: the option A shortcut keeps 3s on 4 x 2 x 2 and pads 4 zero channels (norm 3 * 4), while
    # F = 1.5 on 8 x 2 x 2 (norm 1.5 * sqrt(32)): 1.5 * sqrt(32) / 12 = sqrt(2) / 2.
    model = ResNet(BasicBlock, [1, 1], [4, 8], in_channels=4, shortcut="A")
    model.conv1 = model.bn1 = torch.nn.Identity()
    first, second = model.blocks()
    constant_branch(first, 1.0)
    constant_branch(second, 1.5)
    batches = [(torch.full((3, 4, 4, 4), 2.0), torch.zeros(3))]
    ratios = branch_ratios(model, batches, lambda x: x, torch.device("cpu"))
    assert ratios == pytest.approx([0.5, math.sqrt(2) / 2], abs=1e-6)
    assert model.training and not any(block._forward_pre_hooks for block in model.blocks())
