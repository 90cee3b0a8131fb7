"""Soak: many distinct digit images at high concurrency against a live ``python -m service``, every
answer checked against a single-image prediction of the same image made beforehand by the same
server; the server's resident memory and open file descriptors sampled throughout.

    python -m bench.soak                         # 20,000 requests at concurrency 64 (make soak)
    python -m bench.soak --requests 2000         # a quick one

Phases: images (scikit-learn digits, each shifted by up to 3 px and given its own noise, so no two
bodies are equal), server, reference (one request at a time: batches of one), soak (concurrency 64:
the micro-batcher mixes images from concurrent requests into shared batches), report. A 429 is the
service's deliberate backpressure: counted, then retried after its Retry-After. Stops by itself after
``--max-seconds``. Writes ``soak.json`` to ``--out`` and exits non-zero when a criterion fails.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np
from PIL import Image

from bench.harness import Server, ServerFailed, start_service

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Config:
    requests: int = 20_000
    concurrency: int = 64
    warmup_fraction: float = 0.1  # of the soak's requests, before the RSS baseline is taken
    max_seconds: float = 1200.0  # the whole run, reference included; it stops there whatever is left
    tolerance: float = 1e-6  # max |p_soak - p_reference| over every class of every image
    max_rss_growth: float = 0.05  # RSS at the end vs after warm-up
    max_fd_growth: int = 2  # open fds at the end vs after warm-up, both with no client connected
    seed: int = 0
    out: Path = ROOT / "bench" / "results"


# --- images -------------------------------------------------------------------------------------


def distinct_digits(n: int, seed: int) -> tuple[list[bytes], list[int]]:
    """n PNGs (32x32, 8-bit grey) from the 1797 digits, each shifted and noised differently."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    bodies, labels, seen = [], [], set()
    while len(bodies) < n:
        k = int(rng.integers(len(digits.images)))
        img = Image.fromarray(np.rint(digits.images[k] * 255 / 16).astype(np.uint8), "L")
        arr = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
        dy, dx = rng.integers(-3, 4, size=2)
        arr = np.roll(arr, (int(dy), int(dx)), axis=(0, 1))
        arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)  # arr: (32, 32)
        buf = io.BytesIO()
        Image.fromarray(arr, "L").save(buf, "PNG")
        body = buf.getvalue()
        if body not in seen:
            seen.add(body)
            bodies.append(body)
            labels.append(int(digits.target[k]))
    return bodies, labels


# --- the server ---------------------------------------------------------------------------------


def start_server(log: Path) -> Server:
    server = start_service({"RESNET_LOG_LEVEL": "warning"}, log)
    try:
        return server.wait_ready(120)
    except ServerFailed as e:
        server.stop()
        raise SystemExit(str(e)) from e


def batch_counts(url: str) -> tuple[float, float]:
    """(images, batches) the server's micro-batcher has run so far, from /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    name = "resnet_serve_predict_batch_size"
    values = dict(line.split(" ") for line in text.splitlines() if line.startswith(name + "_"))
    return float(values.get(name + "_sum", 0)), float(values.get(name + "_count", 0))


def process_sample(pid: int) -> dict[str, int]:
    """Resident memory (kB) and open file descriptors of a process."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return {"rss_kb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


# --- load ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    throttled: int = 0  # 429s, retried
    transport_errors: Counter = field(default_factory=Counter)
    wrong: list = field(default_factory=list)  # (index, max abs diff) beyond tolerance
    max_diff: float = 0.0
    latencies_ms: list = field(default_factory=list)
    done: int = 0

    def merge(self, other: Tally) -> None:
        self.statuses += other.statuses
        self.throttled += other.throttled
        self.transport_errors += other.transport_errors
        self.wrong += other.wrong
        self.max_diff = max(self.max_diff, other.max_diff)
        self.latencies_ms += other.latencies_ms
        self.done += other.done


async def predict(client: aiohttp.ClientSession, body: bytes, tally: Tally, deadline: float) -> list[float] | None:
    """The probabilities for one image; None after a non-429 error or past the deadline."""
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            async with client.post("/predict", data=body, headers={"content-type": "image/png"}) as r:
                status, retry_after = r.status, r.headers.get("retry-after", "1")
                payload = await r.json() if status == 200 else await r.read()
        except (TimeoutError, aiohttp.ClientError) as e:
            tally.transport_errors[type(e).__name__] += 1
            return None
        if status == 429:
            tally.throttled += 1
            await asyncio.sleep(float(retry_after))
            continue
        tally.statuses[status] += 1
        tally.latencies_ms.append((time.perf_counter() - started) * 1000)
        if status != 200:
            return None
        return payload["predictions"][0]["probabilities"]
    return None


async def run_load(url: str, bodies: list[bytes], order: list[int], concurrency: int, deadline: float,
                   expected: dict[int, np.ndarray] | None, tolerance: float,
                   on_progress=None) -> tuple[Tally, dict[int, np.ndarray]]:
    """Send bodies[i] for i in order from `concurrency` workers; compare with `expected` when given."""
    tally, got = Tally(), {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in order:
        queue.put_nowait(i)
    # aiohttp, not httpx.AsyncClient: on this machine httpx's pool served 57 req/s at 64 connections,
    # fewer than with one; aiohttp 226. The client must not be what the soak measures.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:

        async def worker() -> None:
            while not queue.empty() and time.monotonic() < deadline:
                i = queue.get_nowait()
                probs = await predict(client, bodies[i], tally, deadline)
                tally.done += 1
                if probs is None:
                    continue
                p = np.asarray(probs)
                got[i] = p
                if expected is not None:
                    diff = float(np.abs(p - expected[i]).max())
                    tally.max_diff = max(tally.max_diff, diff)
                    if diff > tolerance:
                        tally.wrong.append((i, diff))
                if on_progress is not None:
                    on_progress(tally.done)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally, got


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    cfg = Config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=cfg.requests)
    parser.add_argument("--concurrency", type=int, default=cfg.concurrency)
    parser.add_argument("--max-seconds", type=float, default=cfg.max_seconds)
    parser.add_argument("--out", type=Path, default=cfg.out)
    args = parser.parse_args(argv)
    cfg.requests, cfg.concurrency, cfg.max_seconds = args.requests, args.concurrency, args.max_seconds
    cfg.out = args.out
    cfg.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + cfg.max_seconds

    # images
    bodies, labels = distinct_digits(cfg.requests, cfg.seed)
    print(f"{len(bodies)} distinct PNGs ({sum(map(len, bodies)) / len(bodies):.0f} B on average)", flush=True)

    # server
    server = start_server(cfg.out / "soak-server.log")
    proc, url = server.proc, server.url
    try:
        # reference: one request at a time, so every image is its own batch of one
        t0 = time.monotonic()
        ref_tally, reference = asyncio.run(run_load(url, bodies, list(range(len(bodies))), 1, deadline, None, 0))
        ref_s = time.monotonic() - t0
        print(f"reference: {len(reference)} single-image predictions in {ref_s:.0f} s", flush=True)
        accuracy = float(np.mean([int(np.argmax(reference[i])) == labels[i] for i in reference]))
        distinct_answers = len({tuple(p) for p in reference.values()})  # so a mixed-up answer would show

        # soak: shuffled and concurrent. Warm-up first (its own client), then the rest; the server's
        # RSS and fds are taken with no client connected after each, so the two are comparable.
        order = [i for i in np.random.default_rng(cfg.seed + 1).permutation(len(bodies)).tolist() if i in reference]
        warm_n = int(len(order) * cfg.warmup_fraction)
        samples: list[dict] = []
        batches_before = batch_counts(url)
        t1 = time.monotonic()

        def on_progress(done: int) -> None:
            if done % 1000 == 0:
                samples.append({"done": warm_n + done, "t": round(time.monotonic() - t1, 2),
                                **process_sample(proc.pid)})
                print(f"  {warm_n + done:6d} done, RSS {samples[-1]['rss_kb'] / 1024:.1f} MB, fds {samples[-1]['fds']}",
                      flush=True)

        warm_tally, _ = asyncio.run(run_load(url, bodies, order[:warm_n], cfg.concurrency, deadline, reference,
                                             cfg.tolerance))
        time.sleep(1)  # let the server close the connections the client just closed
        marks = {"after_warmup": process_sample(proc.pid)}
        tally, _ = asyncio.run(run_load(url, bodies, order[warm_n:], cfg.concurrency, deadline, reference,
                                        cfg.tolerance, on_progress))
        soak_s = time.monotonic() - t1
        time.sleep(1)
        marks["end"] = process_sample(proc.pid)
        tally.merge(warm_tally)
        images, batches = (after - before for after, before in zip(batch_counts(url), batches_before, strict=True))
    finally:
        exit_code = server.stop(60)

    # report
    errors = sum(n for s, n in tally.statuses.items() if s != 200) + sum(tally.transport_errors.values())
    lat = np.asarray(tally.latencies_ms)
    warm, end = marks["after_warmup"], marks["end"]
    rss_growth = end["rss_kb"] / warm["rss_kb"] - 1
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "reference": {"requests": len(reference), "seconds": round(ref_s, 1), "accuracy": accuracy,
                      "distinct_answers": distinct_answers,
                      "errors": sum(n for s, n in ref_tally.statuses.items() if s != 200)},
        "soak": {"requests": tally.done, "answered_200": tally.statuses[200], "seconds": round(soak_s, 1),
                 "req_s": round(tally.done / soak_s, 1), "statuses": dict(tally.statuses),
                 "throttled_429": tally.throttled,
                 "transport_errors": dict(tally.transport_errors), "errors_excluding_429": errors,
                 "max_abs_diff": tally.max_diff, "wrong": len(tally.wrong),
                 "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                 "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
                 "mean_batch_size": images / max(batches, 1)},
        "process": {"after_warmup": warm, "end": end, "rss_growth": rss_growth, "fd_growth": end["fds"] - warm["fds"],
                    "samples": samples, "exit_code_on_sigterm": exit_code},
    }
    checks = {
        "all requests sent": tally.done == cfg.requests,
        "distinct images, distinct reference answers": distinct_answers == len(bodies),
        "no errors but 429": errors == 0 and ref_tally.transport_errors == Counter(),
        f"every answer within {cfg.tolerance:g} of its single-image prediction": not tally.wrong
        and tally.statuses[200] == cfg.requests,
        f"RSS growth <= {cfg.max_rss_growth:.0%}": rss_growth <= cfg.max_rss_growth,
        f"fds stable (+{cfg.max_fd_growth} at most)": end["fds"] - warm["fds"] <= cfg.max_fd_growth,
        "clean exit on SIGTERM": exit_code == 0,
    }
    result["checks"] = checks
    (cfg.out / "soak.json").write_text(json.dumps(result, indent=1))
    s = result["soak"]
    print(f"soak: {s['requests']} requests in {s['seconds']} s ({s['req_s']} req/s, mean batch "
          f"{s['mean_batch_size']:.1f}), p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms; statuses "
          f"{s['statuses']}, 429s retried {s['throttled_429']}, transport errors {s['transport_errors']}")
    print(f"answers: max |p - p_single| = {s['max_abs_diff']:.2e} over {s['answered_200']} images, "
          f"{s['wrong']} beyond {cfg.tolerance:g}; reference accuracy {accuracy:.4f}")
    print(f"server: RSS {warm['rss_kb'] / 1024:.1f} MB after warm-up -> {end['rss_kb'] / 1024:.1f} MB at the end "
          f"({rss_growth:+.2%}); fds {warm['fds']} -> {end['fds']}; exit {exit_code} on SIGTERM")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    print(f"wrote {cfg.out / 'soak.json'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
