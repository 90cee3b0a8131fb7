"""CPU time the service spends per request in its own code, without the network: the ASGI app driven in this
process, as uvicorn drives it, with wrk's part and the kernel's sockets left out.

    python -m bench.path_cost --variants default,noaccesslog --repeats 5

Closed-loop wrk figures on a shared 2-core machine swing by 2x from run to run; the CPU seconds this process
spends per request (all its threads: the event loop, the batcher, onnxruntime) move far less, so small costs
such as the access log's are measurable side by side. Each variant is a set of RESNET_ settings; variants are
interleaved within every repeat, odd repeats in reverse order, and the median is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.run import ROOT, write_payloads
from bench.zero_cost import zero_cost_model
from service import access_log
from service.__main__ import configure_logging
from service.app import create_app
from service.settings import Settings

VARIANTS = {
    "default": {},
    "noaccesslog": {"access_log": False},
    # The access log's lines formatted and written on the event loop, as before service.access_log's writer thread.
    "accesslog_inline": {},
    "batching_off": {"max_batch_size": 1},
    "t1": {"intra_op_threads": 1},
    "nospin": {"ort_spinning": "off"},
}


@contextlib.contextmanager
def access_log_inline(inline: bool) -> Iterator[None]:
    """The access logger's records handed straight to the root handlers (inline) instead of its writer thread."""
    handlers = access_log.log.handlers[:] if inline else []
    for handler in handlers:
        access_log.log.removeHandler(handler)
    access_log.log.propagate = inline or not access_log.log.handlers
    try:
        yield
    finally:
        for handler in handlers:
            access_log.log.addHandler(handler)
        access_log.log.propagate = not access_log.log.handlers


class Lifespan:
    """The ASGI lifespan protocol, as a server speaks it: startup before the first request, shutdown after."""

    def __init__(self, app) -> None:
        self.app, self.inbox = app, asyncio.Queue()
        self.started, self.stopped = asyncio.Event(), asyncio.Event()

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send(self, message: dict) -> None:
        if message["type"].startswith("lifespan.startup"):
            if message["type"] != "lifespan.startup.complete":
                raise RuntimeError(message.get("message", "startup failed"))
            self.started.set()
        elif message["type"].startswith("lifespan.shutdown"):
            self.stopped.set()

    async def __aenter__(self) -> Lifespan:
        self.task = asyncio.create_task(self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                                 self.receive, self.send))
        await self.inbox.put({"type": "lifespan.startup"})
        await self.started.wait()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self.stopped.wait()
        await self.task


async def request(app, path: str, body: bytes = b"", ctype: str = "", method: str = "POST") -> int:
    """One HTTP request through the app; its status."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"bench"), (b"content-type", ctype.encode()),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    sent = False
    status = 0

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected until the answer is sent
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def measure(settings: Settings, body: bytes, ctype: str, concurrency: int, requests: int) -> dict:
    app = create_app(settings)
    async with Lifespan(app):
        while await request(app, "/health/ready", method="GET") != 200:  # the model loads after startup
            await asyncio.sleep(0.05)
        async def client(n: int) -> list[int]:
            return [await request(app, "/predict", body, ctype) for _ in range(n)]

        await asyncio.gather(*(client(20) for _ in range(concurrency)))  # warm-up
        gc.collect()
        # The process's clock read around the loop's: where the loop does all the work (a short lone batch runs
        # on it), the process's time still covers the loop's.
        cpu, loop, wall = time.process_time(), time.thread_time(), time.perf_counter()
        statuses = await asyncio.gather(*(client(requests // concurrency) for _ in range(concurrency)))
        wall, loop, cpu = time.perf_counter() - wall, time.thread_time() - loop, time.process_time() - cpu
    done = sum(len(s) for s in statuses)
    bad = sum(code != 200 for s in statuses for code in s)
    return {"loop_us": loop / done * 1e6, "cpu_us": cpu / done * 1e6, "req_s": done / wall, "non200": bad}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.path_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="default,accesslog_inline,noaccesslog", help=f"of {sorted(VARIANTS)}")
    parser.add_argument("--model", choices=("zero", "default"), default="zero",
                        help="zero: the zero-cost model (the path alone); default: models/default.onnx")
    parser.add_argument("--payload", choices=("png32", "multipart32"), default="png32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {sorted(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="path-cost-"))
    model = ROOT / "models" / "default.onnx"
    if args.model == "zero":
        model = zero_cost_model(model, work / "zero.onnx")
    body_file, ctype, _ = write_payloads(work)[args.payload]
    body = body_file.read_bytes()
    # The access log goes where a deployment's stderr goes: a file, not a terminal.
    log_file = open(work / "access.log", "w")  # noqa: SIM115 - open for the whole run
    configure_logging(Settings(access_log=True, log_level="warning"), stream=log_file)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            settings = Settings(model_path=model, grpc_port=0, **VARIANTS[name])
            with access_log_inline(name == "accesslog_inline"):
                got = asyncio.run(measure(settings, body, ctype, args.concurrency, args.requests))
            results[name].append(got)
            print(f"[{r + 1}/{args.repeats}] {name:14} loop {got['loop_us']:6.1f} us/req  all threads "
                  f"{got['cpu_us']:6.1f} us/req  {got['req_s']:6.0f} req/s  "
                  f"non200 {got['non200']}", file=sys.stderr)
    print(f"\n{args.model} model, {args.payload}, {args.concurrency} concurrent, {args.requests} requests, "
          f"medians of {args.repeats}:")
    base = statistics.median(g["loop_us"] for g in results[names[0]])
    for name in names:
        loop, cpu, req_s = (statistics.median(g[k] for g in results[name]) for k in ("loop_us", "cpu_us", "req_s"))
        print(f"  {name:14} event loop {loop:6.1f} us/req ({loop / base:.2f}x {names[0]}), all threads "
              f"{cpu:6.1f} us/req, {req_s:6.0f} req/s")


if __name__ == "__main__":
    main()
