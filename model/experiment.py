"""Why ResNets work, measured: the degradation experiment of He et al. 2015 (Sec. 4.2, Fig. 6), how close
trained residual blocks are to the identity, and option A against option B shortcuts.

    python -m model.experiment degradation                  # digits at 8x8, depths 20 and 56, 3 seeds
    python -m model.experiment degradation --depths 20 32 44 56 110 --seeds 5
    python -m model.experiment degradation --data path/to/images --image-size 32 --colour-mode RGB
    python -m model.experiment degradation --quick          # the whole pipeline in seconds (the tests use it)

Every net trains with one recipe (``RECIPE``; each of its fields is a flag of the same name, as in
``model.train``) and the same seeds; only the architecture differs. The run directory, printed at the start
and at the end, receives ``results.json`` (every curve), ``results.md`` (the tables), ``degradation.png``,
``identity.png``, and one ``model.train`` run directory per net and seed under ``nets/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from model import data as datasets
from model.config import TrainConfig, add_config_flags
from model.engine import evaluate, resolve_device
from model.preprocessing import normaliser
from model.resnet import ResNet, cifar_resnet
from model.train import train

# One recipe for every net. Native 8x8 digits keep 3 seeds of resnet56 within minutes on 2 CPU cores. A 1-pixel
# shift is the paper's 4-pixel pad-and-crop on 32x32 (Sec. 4.2) scaled to 8x8. lr 0.02 after one warm-up epoch,
# not the paper's 0.1: the paper warms its deepest net at 0.01 (Sec. 4.2), and issue 7's first look on digits saw
# resnet-56 reach 0.3% training error at 0.02.
# One torch thread: on our shared 2-core machine two spin-waiting OpenMP threads ran 10-20x slower than one
# whenever another job was running (resnet20 at 8x8: 45 s against 3 s per epoch).
RECIPE = dataclasses.replace(TrainConfig(), image_size=8, shift=1, epochs=20, lr=0.02, threads=1)
# Fields each net sets for itself; every other TrainConfig field is a flag of the experiment.
PER_NET_FIELDS = ("arch", "shortcut", "plain", "seed", "out", "resume", "export", "progress")
QUICK = dict(depths=[8, 14], seeds=2, epochs=2, image_size=8)


@dataclass(frozen=True)
class Net:
    """One architecture of the experiment; each seed trains it once."""

    depth: int
    residual: bool = True
    shortcut: str = "A"  # "A" zero-padding, "B" learned projection (Sec. 3.3); plain nets have no shortcuts
    weight_decay: bool = True  # False: the recipe with weight decay 0, for the identity comparison

    @property
    def name(self) -> str:
        name = f"{'resnet' if self.residual else 'plain'}-{self.depth}"
        if self.residual and self.shortcut != "A":
            name += f"-{self.shortcut}"
        return name if self.weight_decay else name + "-nowd"


def grid(depths: list[int], identity: bool, shortcut_depth: int) -> list[Net]:
    """The plain/residual pair at every depth, then the no-weight-decay and option-B residual nets."""
    nets = [Net(d, residual) for residual in (False, True) for d in depths]
    if identity:
        nets += [Net(d, weight_decay=False) for d in depths]
    if shortcut_depth:
        if Net(shortcut_depth) not in nets:
            nets.append(Net(shortcut_depth))
        nets.append(Net(shortcut_depth, shortcut="B"))
    return nets


@torch.no_grad()
def branch_ratios(model: ResNet, loader: DataLoader, normalise: Callable, device: torch.device) -> list[float]:
    """Per residual block, ||F(a)|| / ||a|| for each image, averaged over the loader: 0 is the identity.

    ``a`` is the block input; where the first block of a stage changes shape, the ratio is taken against the
    shortcut's output (``a`` subsampled and zero-padded, or projected), the term F(a) is added to.
    """
    was_training = model.training
    model.eval()  # running BN statistics, as at inference
    blocks = model.blocks()
    sums = torch.zeros(len(blocks), dtype=torch.float64)

    def measure(i: int) -> Callable:
        def hook(block: torch.nn.Module, inputs: tuple[torch.Tensor]) -> None:
            a = inputs[0]  # a: (N, C, H, W)
            shortcut = a if block.downsample is None else block.downsample(a)
            ratio = block.branch(a).flatten(1).norm(dim=1) / shortcut.flatten(1).norm(dim=1)  # (N,)
            sums[i] += ratio.double().sum().cpu()

        return hook

    handles = [block.register_forward_pre_hook(measure(i)) for i, block in enumerate(blocks)]
    n = 0
    try:
        for pixels, _ in loader:
            model(normalise(pixels.to(device)))
            n += len(pixels)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return (sums / n).tolist()


def mean_std_curve(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation over seeds (axis 0; 0 for a single seed)."""
    return curves.mean(0), curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1:])


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    mean, std = mean_std_curve(np.array(values))
    return {"mean": float(mean), "std": float(std)}


def run_net(net: Net, seed: int, base: TrainConfig, bundle: datasets.DataBundle, out: Path, keep: bool) -> dict:
    """Train ``net`` with the shared recipe; per epoch, measure training error on un-augmented images."""
    cfg = dataclasses.replace(
        base, arch=f"resnet{net.depth}", plain=not net.residual, shortcut=net.shortcut, seed=seed, out=str(out),
        weight_decay=base.weight_decay if net.weight_decay else 0.0, progress=False, resume="", export="",
    )
    device = resolve_device(cfg.device)
    normalise = normaliser(bundle.preprocessing, device)
    train_loader = DataLoader(bundle.train, 256, num_workers=cfg.workers)  # no shuffling, no augmentation
    val_loader = DataLoader(bundle.val, 256, num_workers=cfg.workers)
    result: dict = {"train_error": [], "val_error": [], "train_error_augmented": [], "seconds": []}

    def on_epoch(record: dict, model: ResNet) -> None:
        clean = evaluate(model, train_loader, normalise, device)  # eval mode, as the paper's Fig. 6 curves
        result["train_error"].append(1 - clean["accuracy"])
        result["val_error"].append(1 - record["val_accuracy"])
        result["train_error_augmented"].append(record["train_error"])
        result["seconds"].append(record["seconds"])
        if record["epoch"] == cfg.epochs:
            result["params"] = sum(p.numel() for p in model.parameters())
            if net.residual:
                result["branch_ratios"] = branch_ratios(model, val_loader, normalise, device)

    train(cfg, on_epoch=on_epoch, bundle=bundle)
    if not keep:
        for name in ("best.pt", "last.pt"):
            (out / name).unlink(missing_ok=True)
    return result


def summarise(nets: dict) -> None:
    """Add each net's final-epoch errors and mean block ratios, mean ± std over seeds, in place."""
    for entry in nets.values():
        runs = list(entry["seeds"].values())
        entry["params"] = runs[0]["params"]
        entry["final"] = {k: mean_std([r[k][-1] for r in runs]) for k in ("train_error", "val_error")}
        if "branch_ratios" in runs[0]:
            entry["final"]["mean_branch_ratio"] = mean_std([statistics.fmean(r["branch_ratios"]) for r in runs])


def verdict(nets: dict, depths: list[int]) -> dict:
    """Whether the deepest net trains worse than the shallowest: mean training errors further apart than the sum
    of their standard deviations over seeds."""
    lo, hi = min(depths), max(depths)

    def deeper_worse(kind: str) -> bool:
        deep, shallow = nets[f"{kind}-{hi}"]["final"]["train_error"], nets[f"{kind}-{lo}"]["final"]["train_error"]
        return deep["mean"] - shallow["mean"] > deep["std"] + shallow["std"]

    plain, resnet = deeper_worse("plain"), deeper_worse("resnet")
    return {"shallow": lo, "deep": hi, "plain_deeper_worse": plain, "resnet_deeper_worse": resnet,
            "degradation_observed": plain and not resnet}


def pct(stat: dict) -> str:
    return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def seeds(results: dict) -> str:
    n = len(results["seeds"])
    return f"{n} seed{'s' * (n > 1)}"


def markdown(results: dict) -> str:
    nets, recipe, v = results["nets"], results["recipe"], results["verdict"]
    size = recipe["image_size"]
    lines = [
        f"# Degradation: {results['data']} at {size}x{size}, {seeds(results)}, {recipe['epochs']} epochs",
        "",
        f"Recipe, identical for every net: SGD (momentum {recipe['momentum']}), batch {recipe['batch_size']}, "
        f"lr {recipe['lr']} after {recipe['warmup_epochs']} warm-up epoch(s) from {recipe['warmup_lr']}, "
        f"{recipe['schedule']} schedule, weight decay {recipe['weight_decay']}, "
        f"random shifts of up to {recipe['shift']} px. "
        f"Errors are at the last epoch, in %, mean ± std over seeds {results['seeds']}; training error on the "
        f"un-augmented training set in eval mode. {results['hardware']}; {results['wall_seconds'] / 60:.1f} min.",
        "",
        "| net | depth | shortcut | weight decay | params | training error (%) | validation error (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in nets.items():
        shortcut = e["shortcut"] if e["residual"] else "none"
        wd = recipe["weight_decay"] if e["weight_decay"] else 0
        lines.append(f"| {name} | {e['depth']} | {shortcut} | {wd} | {e['params']:,} | "
                     f"{pct(e['final']['train_error'])} | {pct(e['final']['val_error'])} |")
    lo, hi = v["shallow"], v["deep"]
    lines += [
        "",
        f"plain-{hi} {'trains worse' if v['plain_deeper_worse'] else 'does not train worse'} than plain-{lo}; "
        f"resnet-{hi} {'trains worse' if v['resnet_deeper_worse'] else 'does not train worse'} than resnet-{lo} "
        "(worse: final training errors further apart than the sum of their stds). "
        f"Degradation ordering {'observed' if v['degradation_observed'] else 'NOT observed'}.",
    ]
    for b in nets.values():
        if b["residual"] and b["shortcut"] == "B":
            a = nets[Net(b["depth"], weight_decay=b["weight_decay"]).name]
            lines += ["", f"Shortcuts at depth {b['depth']}:", "",
                      "| shortcut | params | training error (%) | validation error (%) |", "|---|---|---|---|"]
            for label, e in (("A: zero-padding", a), ("B: projection", b)):
                final = e["final"]
                lines.append(f"| {label} | {e['params']:,} | {pct(final['train_error'])} | {pct(final['val_error'])} |")
    ratios = [(n, e) for n, e in nets.items() if "mean_branch_ratio" in e["final"]]
    if ratios:
        lines += ["", "| net | ‖F(a)‖ / ‖a‖, mean over blocks and validation images |", "|---|---|"]
        lines += [f"| {n} | {e['final']['mean_branch_ratio']['mean']:.3f} ± "
                  f"{e['final']['mean_branch_ratio']['std']:.3f} |" for n, e in ratios]
    return "\n".join(lines) + "\n"


def plot_degradation(results: dict, path: Path) -> None:
    """Fig. 6 of the paper: error against epoch, plain dashed, residual solid, one colour per depth."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    colours = colormaps["tab10"]
    for ax, key, title in zip(axes, ("train_error", "val_error"), ("training error", "validation error"), strict=True):
        for i, depth in enumerate(results["depths"]):
            for kind, style in (("plain", "--"), ("resnet", "-")):
                runs = results["nets"][f"{kind}-{depth}"]["seeds"].values()
                curves = 100 * np.array([r[key] for r in runs])  # (seeds, epochs)
                epochs = np.arange(1, curves.shape[1] + 1)
                mean, std = mean_std_curve(curves)
                ax.plot(epochs, mean, style, color=colours(i), label=f"{kind}-{depth}")
                ax.fill_between(epochs, mean - std, mean + std, color=colours(i), alpha=0.15, linewidth=0)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("error (%)")
    axes[0].legend()
    recipe = results["recipe"]
    fig.suptitle(f"{results['data']} {recipe['image_size']}x{recipe['image_size']}, lr {recipe['lr']}: "
                 f"mean ± std over {seeds(results)} (training error un-augmented, eval mode)")
    fig.savefig(path, dpi=90)


def plot_identity(results: dict, path: Path) -> None:
    """||F(a)|| / ||a|| per residual block, with against without weight decay, one panel per depth."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    depths = [d for d in results["depths"] if f"resnet-{d}" in results["nets"]]
    fig = Figure(figsize=(5 * len(depths), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(depths), sharey=True))
    for ax, depth in zip(axes, depths, strict=True):
        wd = results["recipe"]["weight_decay"]
        for name, style, label in ((f"resnet-{depth}", "-o", f"weight decay {wd}"),
                                   (f"resnet-{depth}-nowd", ":s", "no weight decay")):
            if name not in results["nets"]:
                continue
            ratios = np.array([r["branch_ratios"] for r in results["nets"][name]["seeds"].values()])  # (seeds, blocks)
            blocks = np.arange(1, ratios.shape[1] + 1)
            mean, std = mean_std_curve(ratios)
            line = ax.plot(blocks, mean, style, markersize=3, label=f"{label} ({mean.mean():.2f} on average)")[0]
            ax.fill_between(blocks, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
        per_stage = (depth - 2) // 6
        for b in (per_stage + 0.5, 2 * per_stage + 0.5):  # the first block of stages 2 and 3 halves H and W
            ax.axvline(b, color="grey", linewidth=0.8, linestyle="--")
        ax.set(title=f"resnet-{depth}", xlabel="residual block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("‖F(a)‖ / ‖a‖  (0: the block is the identity)")
    fig.suptitle(f"{results['data']}: residual branch against its input, per block; mean ± std over {seeds(results)}")
    fig.savefig(path, dpi=90)


def hardware(cfg: TrainConfig) -> str:
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        return f"1 {torch.cuda.get_device_name(device)}"
    threads = cfg.threads or torch.get_num_threads()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {threads} torch thread{'s' * (threads > 1)})"


def degradation(args: argparse.Namespace, base: TrainConfig) -> Path:
    out = Path(args.out or f"runs/experiment/degradation-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: run directory {out} is not empty; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    print(f"run directory: {out}", flush=True)
    seeds = list(range(args.seeds))
    shortcut_depth = min(args.depths) if args.shortcut_depth is None else args.shortcut_depth
    nets = grid(args.depths, args.identity, shortcut_depth)
    bundle = datasets.load_bundle(base)
    print(datasets.summary(bundle), flush=True)
    t0 = time.perf_counter()
    results: dict = {
        "command": ["python", "-m", "model.experiment", *args.argv],
        "data": bundle.name, "recipe": dataclasses.asdict(base), "depths": args.depths, "seeds": seeds,
        "hardware": hardware(base), "nets": {},
    }
    total, done = len(nets) * len(seeds), 0
    for net in nets:
        entry = {**dataclasses.asdict(net), "seeds": {}}
        results["nets"][net.name] = entry
        for seed in seeds:
            done += 1
            print(f"--- {net.name} seed {seed} ({done}/{total})", flush=True)
            entry["seeds"][str(seed)] = run_net(net, seed, base, bundle, out / "nets" / f"{net.name}-s{seed}",
                                                args.keep_checkpoints)
    summarise(results["nets"])
    results["verdict"] = verdict(results["nets"], args.depths)
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)

    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plot_degradation(results, out / "degradation.png")
    if args.identity:
        plot_identity(results, out / "identity.png")
    print(markdown(results))
    print(f"run directory: {out}", flush=True)
    return out


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, TrainConfig]:
    parser = argparse.ArgumentParser(prog="python -m model.experiment", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("degradation", help="plain against residual nets at increasing depth")
    sub.add_argument("--depths", type=int, nargs="+", default=[20, 56], help="CIFAR-style depths 6n+2, >= 2 of them")
    sub.add_argument("--seeds", type=int, default=3, help="train every net with seeds 0 .. N-1")
    sub.add_argument("--shortcut-depth", type=int, default=None,
                     help="depth of the option A against B comparison (default: the shallowest; 0: skip it)")
    sub.add_argument("--identity", action=argparse.BooleanOptionalAction, default=True,
                     help="also train the residual nets without weight decay, for the identity comparison")
    sub.add_argument("--out", default="", help="run directory (default: runs/experiment/degradation-<time>)")
    sub.add_argument("--keep-checkpoints", action="store_true", help="keep each net's best.pt and last.pt")
    sub.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK}, unless given explicitly")
    add_config_flags(sub, RECIPE, skip=PER_NET_FIELDS)
    if "--quick" in argv:
        sub.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    args.argv = argv
    if len(set(args.depths)) < 2:
        parser.error(f"--depths needs at least two distinct depths 6n+2 (20, 32, 44, 56, 110), got {args.depths}")
    checks = [*(("--depths must hold depths 6n+2", d) for d in args.depths),
              *([("--shortcut-depth must be 0 or a depth 6n+2", args.shortcut_depth)] if args.shortcut_depth else [])]
    for rule, depth in checks:
        try:
            cifar_resnet(depth)  # the architecture's own depth check, before hours of training
        except ValueError as e:
            parser.error(f"{rule}: {e}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    args.depths = sorted(set(args.depths))
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(PER_NET_FIELDS)
    base = dataclasses.replace(RECIPE, **{name: getattr(args, name) for name in fields})
    return args, base


def main(argv: list[str] | None = None) -> None:
    args, base = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        degradation(args, base)
    except datasets.DataError as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
