"""gRPC against REST in the same run, on the same server: the Open Inference Protocol over gRPC (port 8001), the
same protocol over HTTP with Triton's binary tensor data, and /predict, for one 32x32 PNG a request (png32) and
32 a request (batch32, multipart-sized). Docs: docs/open-inference-protocol.md#grpc-or-rest.

    python -m bench.grpc_bench [--seconds 5] [--repeats 3] [--concurrency 1 16] [--out docs/bench/grpc.md]

The load generator is this process: asyncio clients that send prepared bytes and read the answer without
decoding it (gRPC: grpc.aio, bytes in and out, no protobuf work; HTTP: raw HTTP/1.1), each client on its own
connection, so both doors cost the client about the same and little. Debian packages neither ghz nor grpcurl,
and wrk has no gRPC. The client's CPU and the server's are measured per cell (cores = CPU seconds / wall
seconds), so the figures show how much of the machine the client took.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default.onnx"
METHOD = "/inference.GRPCInferenceService/ModelInfer"
TICKS = os.sysconf("SC_CLK_TCK")


def digit_pngs(n: int) -> list[bytes]:
    """n distinct scikit-learn digits as 32x32 PNGs, as the default model was trained on them."""
    from sklearn.datasets import load_digits

    out = []
    for pixels in load_digits().images[:n]:
        buf = io.BytesIO()
        img = Image.fromarray(np.rint(pixels * 255 / 16).astype(np.uint8), "L")
        img.resize((32, 32), Image.Resampling.BILINEAR).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def framed(images: list[bytes]) -> bytes:
    return b"".join(len(i).to_bytes(4, "little") + i for i in images)


def grpc_body(images: list[bytes]) -> bytes:
    from service.proto import inference_pb2 as pb

    return pb.ModelInferRequest(
        model_name="default", raw_input_contents=[framed(images)],
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="BYTES", shape=[len(images)])],
    ).SerializeToString()


def http_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def v2_request(images: list[bytes]) -> bytes:
    """The V2 REST request tritonclient.http sends: a JSON header, then the BYTES tensor as binary data."""
    blob = framed(images)
    header = json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [len(images)],
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return http_request("/v2/models/default/infer", header + blob, {
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})


def predict_request(images: list[bytes]) -> bytes:
    if len(images) == 1:
        return http_request("/predict", images[0], {"Content-Type": "image/png"})
    boundary = "benchboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(images)]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return http_request("/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


# --- the clients ------------------------------------------------------------------------------------------------


async def grpc_load(target: str, body: bytes, concurrency: int, until: float) -> tuple[list[float], int]:
    import grpc

    latencies, errors = [], 0

    async def worker() -> None:
        nonlocal errors
        # A channel (one HTTP/2 connection) per client, as the HTTP clients each hold a connection: streams
        # multiplexed on one channel are slower here (docs/open-inference-protocol.md#grpc-or-rest).
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary(METHOD)  # no serializers: prepared bytes out, the answer's bytes back
            while time.perf_counter() < until:
                t = time.perf_counter()
                try:
                    await call(body, timeout=30)
                    latencies.append(time.perf_counter() - t)
                except grpc.RpcError:
                    errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.I)


async def http_load(port: int, request: bytes, concurrency: int, until: float) -> tuple[list[float], int]:
    latencies, errors = [], 0

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < until:
                t = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(LENGTH.search(head).group(1)))
                if head[9:12] == b"200":
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def measure(server: subprocess.Popen, load, seconds: float, images: int) -> dict:
    asyncio.run(load(time.perf_counter() + 1.0))  # warm-up: connections, the first batches
    cpu0, server0, t0 = time.process_time(), cpu_seconds(server.pid), time.perf_counter()
    latencies, errors = asyncio.run(load(t0 + seconds))
    wall = time.perf_counter() - t0
    ms = sorted(1000 * x for x in latencies)
    return {
        "req_s": len(ms) / wall, "img_s": len(ms) * images / wall, "errors": errors,
        "p50_ms": statistics.median(ms) if ms else float("nan"),
        "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan"),
        "client_cores": (time.process_time() - cpu0) / wall,
        "server_cores": (cpu_seconds(server.pid) - server0) / wall,
    }


# --- the run ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(http_port: int, grpc_port: int, log: Path) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "RESNET_MODEL_PATH": str(MODEL), "RESNET_HOST": "127.0.0.1", "RESNET_PORT": str(http_port),
           "RESNET_GRPC_PORT": str(grpc_port), "RESNET_LOG_LEVEL": "warning", "RESNET_MAX_QUEUE": "4096",
           "RESNET_MAX_UPLOAD_BYTES": str(50 * 2**20)}
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/health/ready", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready: {log.read_text()[-1500:]}")


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"# gRPC against REST ({meta['date']})", "", f"Machine: {meta['machine']}. Model: {meta['model']}. "
           f"{meta['seconds']:g} s a cell after 1 s of warm-up, medians of {meta['repeats']} interleaved repeats; "
           f"the machine's load average at the end: {meta['load']:.1f} (other work shares it). Command: `"
           + meta["command"] + "`.", "",
           "Images per server core-second is the figure to compare where the server did not get the whole machine.",
           "",
           "| payload | door | clients | req/s | images/s | p50 ms | p99 ms | errors | client cores | server cores "
           "| images per server core-s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['payload']} | {r['door']} | {r['concurrency']} | {r['req_s']:.0f} | {r['img_s']:.0f} | "
                   f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']:.0f} | {r['client_cores']:.2f} | "
                   f"{r['server_cores']:.2f} | {r['img_s'] / r['server_cores']:.0f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many; the doors' order rotates")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = parser.parse_args()

    http_port, grpc_port = free_port(), free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "grpc_bench_server.log"
    server = start_server(http_port, grpc_port, log)
    pngs = digit_pngs(32)
    payloads = {"png32": pngs[:1], "batch32": pngs}
    runs: dict[tuple, list[dict]] = {}
    try:
        for repeat in range(args.repeats):
            for payload, images in payloads.items():
                doors = [
                    ("gRPC", lambda c, until, b=grpc_body(images): grpc_load(f"127.0.0.1:{grpc_port}", b, c, until)),
                    ("V2 REST", lambda c, until, r=v2_request(images): http_load(http_port, r, c, until)),
                    ("/predict", lambda c, until, r=predict_request(images): http_load(http_port, r, c, until)),
                ]
                doors = doors[repeat % 3:] + doors[:repeat % 3]  # each door first in turn: drift hits all alike
                for concurrency in args.concurrency:
                    for door, load in doors:
                        cell = measure(server, lambda until, load=load, c=concurrency: load(c, until),
                                       args.seconds, len(images))
                        runs.setdefault((payload, door, concurrency), []).append(cell)
                        print(json.dumps({"repeat": repeat, "payload": payload, "door": door,
                                          "concurrency": concurrency, **cell}), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    import onnxruntime as ort

    order = {door: i for i, door in enumerate(["gRPC", "V2 REST", "/predict"])}
    rows = [{"payload": p, "door": d, "concurrency": c,
             **{k: statistics.median(cell[k] for cell in cells) for k in cells[0]}}
            for (p, d, c), cells in sorted(runs.items(), key=lambda kv: (list(payloads).index(kv[0][0]), kv[0][2],
                                                                            order[kv[0][1]]))]
    meta = {"date": time.strftime("%Y-%m-%d"), "seconds": args.seconds, "repeats": args.repeats,
            "model": MODEL.name, "load": os.getloadavg()[0],
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
                       f"{platform.python_version()}, onnxruntime {ort.__version__} (CPU)",
            "command": "python -m bench.grpc_bench " + " ".join(sys.argv[1:])}
    table = markdown(rows, meta)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
