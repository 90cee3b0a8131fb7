"""Throughput benchmark: onnxruntime alone vs the hand-written naive app vs our service with batching
off (MAX_BATCH_SIZE=1) and on, side by side in one run, on this machine.

    python -m bench.run                 # resnet20 (default model), zero-cost and resnet50 at 224x224, 3 repeats
    python -m bench.run --quick         # resnet20 and zero-cost only, 1 repeat, short cells
    python -m bench.run --open-loop 2x  # also a constant arrival rate of twice each server's measured capacity
    python -m bench.run --model-file fp32=a.onnx --model-file int8=b.onnx  # given files, interleaved, every server

``zero`` is a model that costs microseconds (``bench/zero_cost.py``) with the default model's contract: its row
is the serving path's own ceiling. Closed-loop load comes from wrk (Debian package ``wrk``; C, so it leaves the
server most of the CPU), open-loop load from h2load (``bench/open_loop.py``), both on 127.0.0.1. Writes
``results.json``, ``results.md`` and ``results.png`` to ``--out`` and prints the ratios the throughput targets
are stated in. Figures are medians over repeats.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import open_loop
from bench.harness import HOST, Server, ServerFailed, free_port, start_service
from bench.zero_cost import zero_cost_model
from contract import INPUT_NAME, LOGITS

ROOT = Path(__file__).resolve().parents[1]
LUA = ROOT / "bench" / "post.lua"
CONCURRENCY = (1, 8, 32, 64)
PAYLOADS = ("png32", "jpeg640", "jpeg12mp", "multipart32")
SERVERS = ("naive_app", "batching_off", "batching_on")
PEERS_DIR = ROOT.parent / "shared" / "peers"  # TorchServe, set up as its docs recommend for batching
# Extra variants for choosing defaults (--servers): 2 uvicorn workers with 1 onnxruntime thread each.
VARIANTS = {"batching_off": {"RESNET_MAX_BATCH_SIZE": "1"},
            "batching_on_w2": {"RESNET_WORKERS": "2", "RESNET_INTRA_OP_THREADS": "1", "RESNET_DECODE_THREADS": "1"},
            "batching_on_nospin": {"RESNET_ORT_SPINNING": "off"},
            # onnxruntime's pool spinning between parallel sections, now that it runs below the event loop's priority.
            "batching_on_spin": {"RESNET_ORT_SPINNING": "on"},
            # ...and spinning only while a session.run is in progress.
            "batching_on_spin_in_run": {"RESNET_ORT_SPINNING": "in_run"},
            # ...and only for a batch that is all the work on the machine (a second session that spins in its runs).
            "batching_on_alone": {"RESNET_ORT_SPINNING": "alone"},
            # ...with one onnxruntime thread a worker for the batches that share the machine.
            "batching_on_alone_t1": {"RESNET_ORT_SPINNING": "alone", "RESNET_INTRA_OP_THREADS": "1"},
            # Every batch handed to the inference thread, a lone one too (RESNET_INLINE_RUN_MS=2 runs it on the loop).
            "batching_on_noinline": {"RESNET_INLINE_RUN_MS": "0"},
            # Two processes, each with an onnxruntime pool of every core that sleeps instead of spinning when idle.
            "batching_on_w2_t2": {"RESNET_WORKERS": "2", "RESNET_DECODE_THREADS": "1", "RESNET_ORT_SPINNING": "off"},
            # The event loop's priority over decoding and inference (RESNET_COMPUTE_NICE, 6 by default), under overload.
            "batching_on_nice0": {"RESNET_COMPUTE_NICE": "0"},
            "batching_on_nice3": {"RESNET_COMPUTE_NICE": "3"},
            # The access log's cost (on by default): the same server without it.
            "batching_on_noaccesslog": {"RESNET_ACCESS_LOG": "false"},
            # GPU hosts have the cores: 4 processes decode in parallel and share the one GPU.
            "batching_on_w4": {"RESNET_WORKERS": "4", "RESNET_DECODE_THREADS": "4"},
            # onnxruntime's CPU pool idle: on CUDA it only runs the few CPU nodes, and spinning threads steal cores.
            "batching_on_t1": {"RESNET_INTRA_OP_THREADS": "1", "RESNET_ORT_SPINNING": "off"},
            "batching_on_w4_t1": {"RESNET_WORKERS": "4", "RESNET_DECODE_THREADS": "4", "RESNET_INTRA_OP_THREADS": "1",
                                  "RESNET_ORT_SPINNING": "off"}}
HEAVY = {"jpeg12mp": 2, "multipart32": 2}  # cell duration multiplier: slow requests need longer windows
REFUSED_P99_MS = 250  # "quickly", for a 429: a quarter of a second, where a queued request waits seconds


# --- inputs -------------------------------------------------------------------------------------


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth image with texture, so JPEG sizes are those of photos rather than of noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / 37 + c) * np.cos(yy / 53 - c) for c in (0, 1, 2)], -1) * 100 + 128
    noise = rng.normal(0, 12, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def digit_png() -> bytes:
    from sklearn.datasets import load_digits

    pixels = np.rint(load_digits().images[7] * 255 / 16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").resize((32, 32), Image.Resampling.BILINEAR).save(buf, "PNG")
    return buf.getvalue()


def write_payloads(folder: Path) -> dict[str, tuple[Path, str, int]]:
    """name -> (body file, content type, images per request)."""
    folder.mkdir(parents=True, exist_ok=True)
    png = digit_png()
    out = {}

    def save(name: str, body: bytes, ctype: str, n: int) -> None:
        (folder / name).write_bytes(body)
        out[name] = (folder / name, ctype, n)

    save("png32", png, "image/png", 1)
    for name, (w, h) in {"jpeg640": (640, 480), "jpeg12mp": (4000, 3000)}.items():
        buf = io.BytesIO()
        photo(w, h).save(buf, "JPEG", quality=90)
        save(name, buf.getvalue(), "image/jpeg", 1)
    boundary = "benchboundary7d3f"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n" for i in range(32)
    )
    save("multipart32", parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}", 32)
    return out


def random_resnet50(path: Path) -> Path:
    """resnet50 at 224x224 with random weights: timing needs the shapes, not the accuracy."""
    if path.exists():
        return path
    import torch

    from model.export import write_onnx
    from model.resnet import build

    torch.manual_seed(0)
    net = build("resnet50", num_classes=1000).eval()
    meta = {"name": "resnet50-random", "labels": [f"class{i}" for i in range(1000)], "input_size": [224, 224],
            "colour_mode": "RGB", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": "bilinear",
            "arch": "resnet50", "data": "none (random weights, for timing)", "val_accuracy": None}
    write_onnx(net, meta, torch.randn(4, 3, 224, 224), path)
    return path


def half_precision(src: Path, path: Path) -> Path:
    """The same model with float16 weights (float32 input/outputs), as ``model.export --fp16`` writes it."""
    if path.exists():
        return path
    import onnx

    from model.export import to_fp16

    onnx.save(to_fp16(onnx.load(src)), path)
    return path


# --- onnxruntime alone --------------------------------------------------------------------------


def ort_alone(model: Path, seconds: float, device: str = "cpu",
              batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> dict:
    """img/s of onnxruntime by itself at each batch size: the ceiling the service is measured against.

    On CUDA three ways of feeding it, with the provider options the service uses: ``numpy`` (plain
    ``session.run``), ``io_binding`` (host input bound, logits written to host memory: what the service
    does) and ``on_device`` (input already on the GPU, logits left there: the raw model, no transfers).
    """
    import onnxruntime as ort

    from service.runtime import CUDA, providers
    from service.settings import Settings

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=providers(Settings(device=device)))
    if device == "cuda" and session.get_providers()[0] != CUDA:
        raise SystemExit(f"--device cuda, but onnxruntime runs on {session.get_providers()[0]}")
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
    uint8_input = session.get_inputs()[0].type == "tensor(uint8)"  # pixels the graph normalises (--uint8-input)

    def sample(n: int) -> np.ndarray:
        rng = np.random.default_rng(0)
        if uint8_input:
            return rng.integers(0, 256, (n, *shape[1:]), dtype=np.uint8)
        return rng.standard_normal((n, *shape[1:])).astype(np.float32)

    def numpy_run(x: np.ndarray):
        return lambda: session.run([LOGITS], {INPUT_NAME: x})

    def host_binding(x: np.ndarray):
        def run():
            binding = session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, x)
            binding.bind_output(LOGITS, "cpu")
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        return run

    def on_device(x: np.ndarray):
        binding = session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        binding.bind_output(LOGITS, "cuda")
        return lambda: session.run_with_iobinding(binding)

    modes = {"numpy": numpy_run}
    if device == "cuda":
        modes.update(io_binding=host_binding, on_device=on_device)
    per_mode: dict[str, dict[int, float]] = {}
    for mode, make in modes.items():
        per_mode[mode] = {}
        for n in batches:
            run = make(sample(n))
            for _ in range(3):  # first runs allocate (and on CUDA choose conv algorithms)
                run()
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / (len(batches) * len(modes)):
                run()
                runs += 1
            per_mode[mode][n] = runs * n / (time.perf_counter() - start)
    return {"device": device, "modes": per_mode}


def median_alone(runs: list[dict]) -> dict:
    """onnxruntime alone over repeats: the median img/s at each batch size, for each way of feeding it."""
    modes = {mode: {n: statistics.median(r["modes"][mode][n] for r in runs) for n in runs[0]["modes"][mode]}
             for mode in runs[0]["modes"]}
    # The figure quoted for the service's ceiling is the way the service feeds the model.
    per_batch = modes["io_binding" if runs[0]["device"] == "cuda" else "numpy"]
    best = max(per_batch, key=per_batch.get)
    return {"device": runs[0]["device"], "batch1_img_s": per_batch[1], "best_batch": best,
            "best_img_s": per_batch[best], "per_batch": per_batch, "modes": modes}


# --- servers and load ---------------------------------------------------------------------------


def free_ports_below_ephemeral(n: int, start: int = 20000) -> int:
    """The first of ``n`` consecutive ports that can be bound now, below the kernel's ephemeral range: after the
    open-loop cells (a connection a request) thousands of ephemeral ports sit in TIME_WAIT, and a server that binds
    one of them without SO_REUSEADDR (TorchServe's management port, port + 1) fails to start."""
    for first in range(start, 32768 - n):
        try:
            sockets = [socket.socket() for _ in range(n)]
            try:
                for i, s in enumerate(sockets):
                    s.bind(("127.0.0.1", first + i))
                return first
            finally:
                for s in sockets:
                    s.close()
        except OSError:
            continue
    raise ServerFailed(f"no {n} consecutive free ports from {start}")


class TorchServe:
    """TorchServe 0.12 with dynamic batching (``shared/peers/torchserve.sh``): a peer measured side by side."""

    def __init__(self, model: Path, log: Path) -> None:
        self.script = PEERS_DIR / "torchserve.sh"
        if not self.script.exists():
            raise ServerFailed(f"no TorchServe peer script at {self.script}")
        port = free_ports_below_ephemeral(3)  # inference, management, metrics: port, port + 1, port + 2
        with open(log, "ab") as out:
            done = subprocess.run([str(self.script), "start", str(model), str(port)], stdout=subprocess.PIPE,
                                  stderr=out, text=True, timeout=900)
        if done.returncode != 0:
            raise ServerFailed(f"torchserve.sh start failed ({done.returncode}); see {log}")
        self.predict_url = done.stdout.strip().splitlines()[-1]
        self.url = self.predict_url.rsplit("/predictions/", 1)[0]
        found = subprocess.run(["pgrep", "-f", "org.pytorch.serve.ModelServer"], capture_output=True, text=True)
        self.pid = int(found.stdout.split()[0]) if found.stdout.split() else None

    def stop(self) -> int:
        return subprocess.run([str(self.script), "stop"], capture_output=True, timeout=120).returncode


def tree_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` and every process below it (workers, TorchServe's Python backend)."""
    if pid is None:
        return float("nan")
    table: dict[int, tuple[int, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    total, frontier = 0, {pid}
    while frontier:
        total += sum(table[p][1] for p in frontier if p in table)
        frontier = {q for q, (parent, _) in table.items() if parent in frontier}
    return total / os.sysconf("SC_CLK_TCK")


def start_server(kind: str, model: Path, log: Path, device: str = "cpu",
                 trees: dict[str, Path] | None = None) -> Server:
    """kind: naive_app, batching_on, a VARIANTS key, or any of those as ``kind@REF`` to run the code of git
    revision REF (checked out in ``trees[REF]``) side by side with the working tree's."""

    kind, _, ref = kind.partition("@")
    if kind == "torchserve":
        return TorchServe(model, log)
    cwd = trees[ref] if ref else ROOT
    env = {"RESNET_MODEL_PATH": str(model), "RESNET_LOG_LEVEL": "warning", "RESNET_MAX_UPLOAD_BYTES": str(50 * 2**20),
           # room for 64 clients x 32 images: the naive app queues without limit, so 429s would not compare
           "RESNET_MAX_QUEUE": "4096", "RESNET_DEVICE": device}
    if kind == "naive_app":
        port = free_port()
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "bench.naive_app:create", "--host", HOST,
               "--port", str(port), "--log-level", "warning", "--no-access-log"]
        server = Server(cmd, log, port=port, cwd=cwd, env={"NAIVE_MODEL": str(model), "NAIVE_DEVICE": device})
    else:
        server = start_service({**env, **VARIANTS.get(kind, {})}, log, cwd=cwd)
    try:
        server.wait_ready(180)
    except ServerFailed:
        server.stop()
        raise
    server.predict_url, server.pid = server.url + "/predict", server.proc.pid
    return server


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unparsable wrk duration {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def wrk(url: str, body: Path, ctype: str, concurrency: int, seconds: float) -> dict:
    cmd = ["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s", "--timeout", "30s",
           "--latency", "-s", str(LUA), url, "--", str(body), ctype]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    out = proc.stdout
    if "requests in" not in out:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out[-800:]} {proc.stderr[-800:]}")
    return parse_wrk(out)


def parse_wrk(out: str) -> dict:
    """wrk's summary (with ``--latency``) as req/s, p50/p99 and counts."""
    latency = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)\s*$", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    all_req_s = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    refused = int(non2xx.group(1)) if non2xx else 0
    return {
        # answered 2xx only: a server refusing fast (429) must not look fast to a closed loop that retries at once
        "req_s": all_req_s * (requests - refused) / requests if requests else 0.0,
        "all_req_s": all_req_s,
        "p50_ms": parse_ms(latency["50"]) if "50" in latency else float("nan"),
        "p99_ms": parse_ms(latency["99"]) if "99" in latency else float("nan"),
        "requests": requests,
        "non_2xx": refused,
        "socket_errors": sum(int(v) for v in errors.groups()) if errors else 0,
    }


# --- report -------------------------------------------------------------------------------------


def median_cells(runs: list[dict]) -> dict:
    """cells[model][server][payload][c] -> medians over repeats of req_s, img_s, p50, p99."""
    out: dict = {}
    for run in runs:
        for (model, server, payload, c), cell in run["cells"].items():
            out.setdefault(model, {}).setdefault(server, {}).setdefault(payload, {}).setdefault(c, []).append(cell)
    for model in out.values():
        for server in model.values():
            for payload in server.values():
                for c, cells in payload.items():
                    payload[c] = {k: statistics.median(x[k] for x in cells) for k in cells[0]}
    return out


def target(name: str, value: float, goal: float, higher_is_better: bool = True) -> tuple[str, float, str, bool]:
    sign = ">=" if higher_is_better else "<="
    return name, value, f"{sign} {goal:g}", value >= goal if higher_is_better else value <= goal


def targets(cells: dict, alone: dict, open_cells: dict | None = None) -> list[tuple[str, float, str, bool]]:
    """(name, measured, goal, met) for each target whose cells this run measured."""
    rows = []
    r20 = cells.get("resnet20", {})
    # issue 14's targets, for the service with its defaults (batching_on) against the peers on the same model
    if {"batching_on", "naive_app"} <= set(r20):
        on, naive, ts = r20["batching_on"], r20["naive_app"], r20.get("torchserve", {})
        png, npng = on.get("png32", {}), naive.get("png32", {})
        if 32 in png and 32 in npng:
            rows += [target("c=32 PNG req/s, on / naive app", png[32]["req_s"] / npng[32]["req_s"], 2.0),
                     target("c=32 PNG p99, on / naive app", png[32]["p99_ms"] / npng[32]["p99_ms"], 0.5, False)]
        for c in (32, 64):
            if c in png and c in ts.get("png32", {}):
                rows.append(target(f"c={c} PNG req/s, on / TorchServe", png[c]["req_s"] / ts["png32"][c]["req_s"], 1.2))
        pairs = [(on[p][c]["req_s"] / naive[p][c]["req_s"], p, c) for p in on for c in on[p]
                 if c in naive.get(p, {})]
        if pairs:
            worst, p, c = min(pairs)
            rows.append(target(f"every cell req/s, on / naive app (lowest: {p} c={c})", worst, 1.0))
        if 1 in png and 1 in npng:
            rows.append(target("c=1 PNG p50, on / naive app", png[1]["p50_ms"] / npng[1]["p50_ms"], 1.1, False))
        if on.get("multipart32") and "resnet20" in alone:
            best_mp = max(v["img_s"] for v in on["multipart32"].values())
            rows.append(target("multipart32 img/s, on / ORT best batch", best_mp / alone["resnet20"]["best_img_s"],
                               0.8))
    zero = cells.get("zero", {})
    if {"batching_on", "naive_app"} <= set(zero) and "png32" in zero["batching_on"]:  # issue 14: the path's ceiling
        on, naive = zero["batching_on"]["png32"], zero["naive_app"].get("png32", {})
        if 64 in on and 64 in naive:
            rows.append(target("zero-cost c=64 PNG req/s, on / naive app", on[64]["req_s"] / naive[64]["req_s"], 3.0))
        if 1 in on and 1 in naive:
            rows.append(target("zero-cost c=1 PNG p50, on / naive app", on[1]["p50_ms"] / naive[1]["p50_ms"], 1.0,
                               False))
    overload = (open_cells or {}).get("resnet20", {}).get("batching_on", {}).get("png32", {}).get("2x")
    if overload:  # issue 14: at twice the capacity, no collapse, and the accepted answered within the deadline
        from service.settings import Settings

        deadline_ms = Settings.model_fields["request_timeout_ms"].default
        rows += [target("open loop 2x capacity, PNG goodput / capacity",
                        overload["goodput_req_s"] / overload["capacity_req_s"], 0.9),
                 target("open loop 2x capacity, 5xx", overload["status_5xx"], 0, False),
                 target("open loop 2x capacity, accepted p99 ms / deadline ms", overload["p99_ms"] / deadline_ms, 1.0,
                        False)]
        if overload["status_429"]:  # the issue's "answers the excess with 429 quickly"; the bound is ours
            rows.append(target("open loop 2x capacity, 429 p99 ms", overload["refused_p99_ms"], REFUSED_P99_MS, False))
    return rows


def markdown(cells: dict, alone: dict, rows: list, meta: dict, open_cells: dict | None = None) -> str:
    lines = [f"Measured {meta['date']} on {meta['machine']}; {meta['repeats']} repeat(s), {meta['seconds']} s per "
             f"cell, medians. Load: wrk, 1 thread, on 127.0.0.1.", ""]
    for model, a in alone.items():
        for mode, per_batch in a["modes"].items():
            best = max(per_batch, key=per_batch.get)
            lines.append(f"- onnxruntime alone on {a['device']}, {model}, {mode}: batch 1 -> {per_batch[1]:.0f} img/s; "
                         f"best (batch {best}) -> {per_batch[best]:.0f} img/s")
    names = list(dict.fromkeys(s for servers in cells.values() for s in servers))
    lines += ["", "| model | payload | c | " + " | ".join(f"{s} req/s (img/s) p50/p99 ms" for s in names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for model, servers in cells.items():
        for payload in PAYLOADS:
            for c in sorted({c for srv in servers.values() for c in srv.get(payload, {})}):
                row = f"| {model} | {payload} | {c} |"
                for s in names:
                    x = servers.get(s, {}).get(payload, {}).get(c)
                    if x is None:
                        row += " - |"
                        continue
                    img = f" ({x['img_s']:.0f})" if payload == "multipart32" else ""
                    bad = f" **{x['non_2xx']:.0f} non-2xx**" if x["non_2xx"] else ""
                    row += f" {x['req_s']:.0f}{img} {x['p50_ms']:.1f}/{x['p99_ms']:.1f}{bad} |"
                lines.append(row)
    if "zero" in cells:
        lines.append("- zero: the zero-cost model (bench/zero_cost.py, microseconds a batch): its rows are what the "
                     "serving path itself allows, the model taken out")
    for model, servers in cells.items():  # the service end to end against the model by itself
        if model == "zero":
            continue  # a model that costs nothing is no ceiling to compare with
        raw = max(max(per_batch.values()) for per_batch in alone[model]["modes"].values())
        for payload in PAYLOADS:
            ours = [(x["img_s"], s, c) for s, srv in servers.items() if s != "naive_app"
                    for c, x in srv.get(payload, {}).items() if not x["non_2xx"]]
            if ours:
                best = max(ours)
                lines.append(f"- {model} {payload}: service best {best[0]:.0f} img/s ({best[1]}, c={best[2]}) = "
                             f"{best[0] / raw:.2f} of onnxruntime alone's best {raw:.0f} img/s")
    if open_cells:
        lines += ["", "Open loop (h2load, one request a connection, constant arrival rate; capacity: the server's best "
                  "closed-loop req/s above):", "",
                  "| model | server | payload | rate | offered req/s | capacity req/s | goodput 2xx/s (of capacity) | "
                  "429 | 5xx | errors | 2xx p50/p99 ms | 429 p50/p99 ms | run s | h2load cores | machine cores: "
                  "user / nice / kernel / idle |",
                  "|---" * 15 + "|"]
        for model, servers in open_cells.items():
            for server, per_payload in servers.items():
                for payload, per_rate in per_payload.items():
                    for rate, x in per_rate.items():
                        share = x["goodput_req_s"] / x["capacity_req_s"] if x["capacity_req_s"] else float("nan")
                        lines.append(f"| {model} | {server} | {payload} | {rate} | {x['offered_req_s']:.0f} | "
                                     f"{x['capacity_req_s']:.0f} | {x['goodput_req_s']:.0f} ({share:.2f}) | "
                                     f"{x['status_429']:.0f} | {x['status_5xx']:.0f} | {x['errors']:.0f} | "
                                     f"{x['p50_ms']:.1f}/{x['p99_ms']:.1f} | "
                                     f"{x['refused_p50_ms']:.1f}/{x['refused_p99_ms']:.1f} | {x['elapsed_s']:.1f} | "
                                     f"{x['client_cores']:.2f} | {machine_split(x)} |")
    if rows:
        lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
        lines += [f"| {name} | {value:.2f} | {goal} | {'yes' if ok else 'no'} |" for name, value, goal, ok in rows]
    return "\n".join(lines) + "\n"


def machine_split(cell: dict) -> str:
    """An open-loop cell's machine CPU (user: event loops and load generator; nice: our decoding and inference;
    kernel: syscalls and TCP), or a dash where it was not read."""
    parts = [cell.get(f"machine_{part}_cores") for part in ("user", "nice", "kernel", "idle")]
    return "-" if None in parts else " / ".join(f"{v:.2f}" for v in parts)


def plot(cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(cells)
    payloads = [p for p in PAYLOADS if any(p in by_payload for m in cells for by_payload in cells[m].values())]
    fig, axes = plt.subplots(len(models) * 2, len(payloads), figsize=(4 * len(payloads), 6 * len(models)),
                             squeeze=False)
    styles = {"naive_app": ("tab:gray", ":"), "batching_off": ("tab:orange", "--"), "batching_on": ("tab:blue", "-")}
    others = iter(["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 4)
    for server in sorted({s for m in cells for s in cells[m]} - set(styles)):  # a colour each, in every panel
        styles[server] = (next(others), "-.")
    for i, model in enumerate(models):
        for j, payload in enumerate(payloads):
            top, bottom = axes[2 * i][j], axes[2 * i + 1][j]
            for server in cells[model]:
                colour, ls = styles[server]
                data = cells[model][server].get(payload)
                if not data:
                    continue
                cs = sorted(data)
                top.plot(cs, [data[c]["img_s"] for c in cs], ls, color=colour, marker="o", label=server)
                bottom.plot(cs, [data[c]["p50_ms"] for c in cs], ls, color=colour, marker="o")
                bottom.plot(cs, [data[c]["p99_ms"] for c in cs], ls, color=colour, marker="x", alpha=0.5)
            top.set_title(f"{model} {payload}")
            top.set_ylabel("images/s")
            bottom.set_ylabel("p50 (o) / p99 (x) ms")
            bottom.set_yscale("log")
            for ax in (top, bottom):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("concurrency")
                ax.grid(alpha=0.3)
            if top.lines:
                top.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def machine(device: str) -> str:
    import onnxruntime as ort

    text = (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"onnxruntime {ort.__version__}")
    if device == "cuda":
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        text += f", GPU {gpu}"
    return text


# --- main ---------------------------------------------------------------------------------------


def named_file(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` of --model-file: an existing file under a name for the tables."""
    name, sep, path = text.partition("=")
    if not sep or not name or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH of an existing ONNX file, got {text!r}")
    return name, Path(path).resolve()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet20 and zero, c=1, 8 and 32, 1 repeat, 2 s cells")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4, help="wrk duration per cell")
    parser.add_argument("--models", default=None, help="of resnet20, zero, resnet50, resnet50-fp16 and the "
                        "--model-file names (default: resnet20,zero,resnet50, or the --model-file names alone)")
    parser.add_argument("--model-file", metavar="NAME=PATH", action="append", default=[], type=named_file,
                        help="also serve this ONNX file, as model NAME, by every server kind (repeatable)")
    parser.add_argument("--open-loop", metavar="RATES", type=open_loop.parse_rates,
                        help="after each server's closed-loop cells, a constant arrival rate of --open-loop-payload: "
                        "e.g. 2x (of that server's best measured req/s), 1500 (req/s), or a list: 1x,2x")
    parser.add_argument("--open-loop-payload", default="png32", choices=PAYLOADS)
    # Sustained, not a burst: a few seconds of overload fit in the kernel's accept queue and look like a slow
    # success; ten show whether the server keeps up (docs/bench/open-loop.md#priority).
    parser.add_argument("--open-loop-seconds", type=int, default=10, help="arrivals per open-loop rate")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"of {SERVERS + tuple(VARIANTS)}")
    parser.add_argument("--payloads", default=",".join(PAYLOADS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where onnxruntime runs, alone and in the servers (cuda needs onnxruntime-gpu)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--batches", default="1,2,4,8,16,32,64", help="batch sizes for onnxruntime alone")
    parser.add_argument("--against", metavar="REF", help="also run each of our servers as of git revision REF "
                        "(e.g. HEAD, main~3), interleaved with the working tree's: a before/after in one run")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed for the load: apt-get install wrk (Debian/Ubuntu) or brew install wrk")
    concurrency, payloads = tuple(int(c) for c in args.concurrency.split(",")), args.payloads.split(",")
    if any(r.factor for r in args.open_loop or ()) and args.open_loop_payload not in payloads:
        parser.error(f"--open-loop rates relative to capacity need {args.open_loop_payload} among --payloads")
    if args.open_loop and shutil.which("h2load") is None:
        raise SystemExit("--open-loop needs h2load: apt-get install nghttp2-client")
    given = dict(args.model_file)
    models = args.models.split(",") if args.models else list(given) or ["resnet20", "zero", "resnet50"]
    if unknown := [m for m in models if m not in ("resnet20", "zero", "resnet50", "resnet50-fp16", *given)]:
        parser.error(f"--models: unknown {unknown}; give a file with --model-file NAME=PATH")
    servers = args.servers.split(",")
    trees = {}
    if args.against:
        trees[args.against] = args.out / f"tree-{re.sub(r'[^A-Za-z0-9_.-]', '_', args.against)}"
        if trees[args.against].exists():  # REF may name another commit than last time (HEAD, a branch)
            subprocess.run(["git", "worktree", "remove", "--force", str(trees[args.against])], cwd=ROOT, check=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(trees[args.against]), args.against], cwd=ROOT,
                       check=True)
        peers = ("naive_app", "torchserve")  # not ours: no earlier revision of them
        servers = [x for s in servers for x in ([s] if s in peers else [s, f"{s}@{args.against}"])]
    if args.quick:
        args.repeats, args.seconds, models, concurrency = 1, 2, list(given) or ["resnet20", "zero"], (1, 8, 32)
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = write_payloads(args.out / "payloads")
    model_files = {"resnet20": ROOT / "models" / "default.onnx", **given}
    if "zero" in models:
        model_files["zero"] = zero_cost_model(model_files["resnet20"], args.out / "zero-cost.onnx")
    if {"resnet50", "resnet50-fp16"} & set(models):
        model_files["resnet50"] = random_resnet50(args.out / "resnet50-random.onnx")
    if "resnet50-fp16" in models:
        model_files["resnet50-fp16"] = half_precision(model_files["resnet50"], args.out / "resnet50-random-fp16.onnx")
    log = args.out / "servers.log"
    log.write_text("")

    batches = tuple(sorted({1, *(int(n) for n in args.batches.split(","))}))  # batch 1 is always reported
    alone_runs: dict[str, list[dict]] = {m: [] for m in models}
    runs = []
    for repeat in range(args.repeats):
        cells, open_cells = {}, {}
        for m in models if repeat % 2 == 0 else models[::-1]:  # as for servers, below
            # onnxruntime alone in every repeat too: the ratios to it then see the same machine load.
            a = ort_alone(model_files[m], 7.0 if not args.quick else 3.5, args.device, batches)
            alone_runs[m].append(a)
            for mode, per_batch in a["modes"].items():
                print(f"[{repeat + 1}/{args.repeats}] onnxruntime alone {m} on {args.device} ({mode}): " +
                      ", ".join(f"b{n} {v:.0f}" for n, v in per_batch.items()) + " img/s", flush=True)
            # Odd repeats go through the servers backwards, so drift in a shared machine's load does not
            # favour whichever server always comes first.
            for server in servers if repeat % 2 == 0 else servers[::-1]:
                srv = start_server(server, model_files[m], log, args.device, trees)
                try:
                    for payload in payloads:
                        if server == "torchserve" and payload == "multipart32":
                            continue  # its handler takes one raw image a request
                        body, ctype, n = inputs[payload]
                        for c in concurrency:
                            cpu = tree_cpu_s(srv.pid)
                            cell = wrk(srv.predict_url, body, ctype, c, args.seconds * HEAVY.get(payload, 1))
                            # Server CPU per request: a cost figure that noise on a shared machine moves little.
                            cell["cpu_ms"] = (tree_cpu_s(srv.pid) - cpu) * 1e3 / max(cell["requests"], 1)
                            cell["img_s"] = cell["req_s"] * n
                            cells[(m, server, payload, c)] = cell
                            print(f"[{repeat + 1}/{args.repeats}] {m:8s} {server:12s} {payload:11s} c={c:<3d} "
                                  f"{cell['req_s']:8.1f} req/s  p50 {cell['p50_ms']:8.2f} ms  p99 "
                                  f"{cell['p99_ms']:8.2f} ms  cpu {cell['cpu_ms']:.3f} ms/req  non2xx "
                                  f"{cell['non_2xx']}", flush=True)
                    for rate in args.open_loop or ():
                        payload = args.open_loop_payload
                        body, ctype, _ = inputs[payload]
                        measured = [cells[(m, server, payload, c)]["req_s"] for c in concurrency
                                    if (m, server, payload, c) in cells]
                        capacity = max(measured) if measured else None
                        cell = open_loop.run(srv.predict_url, body, ctype, rate.resolve(capacity),
                                             args.open_loop_seconds, args.out / "h2load.log")
                        cell["capacity_req_s"] = capacity if capacity is not None else float("nan")
                        open_cells[(m, server, payload, rate.text)] = cell
                        print(f"[{repeat + 1}/{args.repeats}] {m:8s} {server:12s} {payload:11s} open {rate.text:>5s} "
                              f"{cell['offered_req_s']:7.0f} offered -> {cell['goodput_req_s']:7.1f} 2xx/s  429 "
                              f"{cell['status_429']}  5xx {cell['status_5xx']}  errors {cell['errors']}  p50/p99 "
                              f"{cell['p50_ms']:.1f}/{cell['p99_ms']:.1f} ms  429 p50/p99 {cell['refused_p50_ms']:.1f}/"
                              f"{cell['refused_p99_ms']:.1f} ms  run {cell['elapsed_s']:.1f} s  h2load "
                              f"{cell['client_cores']:.2f} cores  machine user/nice/kernel/idle {machine_split(cell)}",
                              flush=True)
                finally:
                    srv.stop()
        runs.append({"cells": cells, "open_loop": open_cells})

    for tree in trees.values():  # the checkout of --against REF is only for this run
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    medians = median_cells(runs)
    open_medians = median_cells([{"cells": r["open_loop"]} for r in runs])  # keyed by rate where cells have c
    alone = {m: median_alone(a) for m, a in alone_runs.items()}
    rows = targets(medians, alone, open_medians) if args.device == "cpu" else []  # the targets are this machine's CPU
    meta = {"date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "seconds": args.seconds, "device": args.device,
            "machine": machine(args.device),
            "command": "python -m bench.run " + " ".join(argv or sys.argv[1:])}
    serialisable = [{"cells": [{"model": k[0], "server": k[1], "payload": k[2], "c": k[3], **v}
                               for k, v in r["cells"].items()],
                     "open_loop": [{"model": k[0], "server": k[1], "payload": k[2], "rate": k[3], **v}
                                   for k, v in r["open_loop"].items()]} for r in runs]
    (args.out / "results.json").write_text(json.dumps(
        {"meta": meta, "onnxruntime_alone": alone, "runs": serialisable, "medians": medians,
         "open_loop_medians": open_medians,
         "targets": [{"name": n, "value": v, "goal": g, "met": ok} for n, v, g, ok in rows]}, indent=1))
    md = markdown(medians, alone, rows, meta, open_medians)
    (args.out / "results.md").write_text(md)
    plot(medians, args.out / "results.png")
    print(md)
    print(f"wrote {args.out}/results.json, results.md, results.png")


if __name__ == "__main__":
    main()
