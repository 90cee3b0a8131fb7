"""Several worker processes behind one port: each a whole service (HTTP, core, its own onnxruntime session),
each listening on its own ``SO_REUSEPORT`` socket, under this supervisor.

Why this shape: with one shared listening socket (uvicorn's ``--workers``) whichever worker wakes first accepts
a burst of connections, and a closed-loop load could land almost entirely on one of two workers
(docs/throughput.md#worker-processes). With a socket per worker the kernel spreads new connections over the workers by
a hash of the connection, and a worker that is still loading has no socket listening yet, so it gets none. The
hash can give one worker more than its share (two clients on one worker half the time); that worker then closes
one of its connections after a response, and the client's next one is hashed anew (``service.balance``).

The supervisor replaces a worker that dies (the OOM killer's kill -9 included; connections the dead worker held
are reset at once, so their clients fail fast), forwards SIGHUP (reload the model) to every worker, and on
SIGTERM/SIGINT drains them all. Metrics are aggregated over the workers (prometheus-client's multiprocess mode,
``service.metrics``), so any worker's ``/metrics`` answers for all of them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from service.activity import Activity
from service.balance import ConnectionShares
from service.settings import Settings

log = logging.getLogger("service")

RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0)  # a worker that keeps dying is restarted ever more slowly
STABLE_AFTER_S = 30.0  # a worker that lived this long resets the backoff


def reuseport_socket(host: str, port: int) -> socket.socket:
    """Bound, not yet listening: the server calls listen() once the worker's model is ready."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_worker(settings: Settings, index: int, statistics: Path, shares: Path, activity: Path) -> None:
    """A worker process: the whole service on its own SO_REUSEPORT socket, counting its inference statistics into
    row ``index`` of the shared file ``statistics``, its connections into cell ``index`` of ``shares`` and the
    images it holds into cell ``index`` of ``activity``."""
    from service import metrics
    from service.__main__ import configure_logging, run_server

    configure_logging(settings)
    metrics.STATISTICS.attach(statistics, index)
    os.environ["RESNET_WORKER_INDEX"] = str(index)
    sock = reuseport_socket(settings.host, settings.port)
    run_server(settings, sockets=[sock], supervised=True, shares=ConnectionShares(shares, index),
               activity=Activity(activity, index))


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited onnxruntime threads
        self.workers: dict[int, BaseProcess] = {}
        self.started: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.stopping = False
        self.reload_requested = False

    def spawn(self, index: int) -> None:
        args = (self.settings, index, self.statistics, self.shares_path, self.activity_path)
        proc = self.context.Process(target=run_worker, args=args, name=f"worker-{index}")
        proc.start()
        self.workers[index], self.started[index] = proc, time.monotonic()
        log.info("worker %d started (pid %d)", index, proc.pid)

    def run(self) -> int:
        metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        owned = metrics_dir is None
        if owned:
            metrics_dir = tempfile.mkdtemp(prefix="resnet-serve-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by every worker
        from service.metrics import InferenceStatistics  # here: metrics made at import would not be multiprocess

        self.statistics = Path(metrics_dir) / f"inference-statistics-{os.getpid()}.bin"
        InferenceStatistics.create(self.statistics, self.settings.effective_workers)
        self.shares_path = Path(metrics_dir) / f"connection-shares-{os.getpid()}.bin"
        ConnectionShares.create(self.shares_path, self.settings.effective_workers)
        self.activity_path = Path(metrics_dir) / f"activity-{os.getpid()}.bin"
        Activity.create(self.activity_path, self.settings.effective_workers)
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            # Fail early, with the supervisor's own message, when the port cannot be had at all.
            reuseport_socket(self.settings.host, self.settings.port).close()
            for index in range(self.settings.effective_workers):
                self.spawn(index)
            while not self.stopping:
                if self.reload_requested:
                    self.reload_requested = False
                    self.forward(signal.SIGHUP)
                self.replace_dead()
                time.sleep(0.1)
            return self.drain()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if owned:
                shutil.rmtree(metrics_dir, ignore_errors=True)

    def on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        elif not self.stopping:
            self.stopping = True
            # At once, not at the next turn of the loop: readiness turns 503 in every worker as the signal arrives.
            # Once only: a second SIGTERM makes uvicorn abandon its graceful shutdown.
            self.forward(signal.SIGTERM)

    def forward(self, sig: int) -> None:
        for proc in self.workers.values():
            if proc.is_alive():
                os.kill(proc.pid, sig)

    def replace_dead(self) -> None:
        from prometheus_client import multiprocess

        for index, proc in list(self.workers.items()):
            if proc.is_alive():
                continue
            lived = time.monotonic() - self.started[index]
            self.failures[index] = 0 if lived > STABLE_AFTER_S else self.failures.get(index, 0) + 1
            multiprocess.mark_process_dead(proc.pid)
            ConnectionShares.vacate(self.shares_path, index)  # its connections are gone with it
            Activity.vacate(self.activity_path, index)
            delay = RESTART_BACKOFF_S[min(self.failures[index], len(RESTART_BACKOFF_S) - 1)]
            log.error("worker %d (pid %d) exited with %s after %.1f s; restarting in %.0f s", index, proc.pid,
                      proc.exitcode, lived, delay)
            del self.workers[index]
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and not self.stopping:
                time.sleep(0.1)
            if not self.stopping:
                self.spawn(index)

    def drain(self) -> int:
        """Wait for every worker, SIGTERMed by ``on_signal`` (each turns not-ready and finishes what it accepted)."""
        log.info("draining %d workers", len(self.workers))
        deadline = time.monotonic() + self.settings.drain_timeout_s + 5
        status = 0
        for proc in self.workers.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join()
                status = 1
            elif proc.exitcode not in (0, -signal.SIGTERM):  # -SIGTERM: ours, before it could install its handler
                status = 1
        return status
