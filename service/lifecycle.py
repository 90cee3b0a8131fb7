"""The service's life, in one place: start (state, micro-batcher, model loaded in the background), the signals
(SIGTERM/SIGINT drain, SIGHUP reload), and stop (drain, then release the batcher and the thread pools)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from service import metrics
from service.activity import Activity
from service.batching import MicroBatcher
from service.core import ServiceState
from service.errors import ReloadFailed
from service.runtime import Model
from service.settings import Settings

log = logging.getLogger("service")


def keep_clean_exit_after_drain() -> Callable[[], bool]:
    """uvicorn re-raises the signal that stopped it once it has shut down gracefully; with SIGTERM's default
    action that would turn a clean drain into exit status 143. The drain is the handling: exit 0. A SIGTERM that
    arrives before uvicorn installs its own handler (a worker told to stop while it starts) is remembered: the
    returned check tells the server to drain as soon as it has started, instead of serving on."""
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    return stopped.is_set


def reload_other_workers(state: ServiceState) -> None:
    """After an /admin/reload under the supervisor: it forwards SIGHUP to every worker (this one reloads again,
    which is harmless: the same file, under the reload lock)."""
    if state.supervised:
        os.kill(os.getppid(), signal.SIGHUP)


def _reload_on_sighup(state: ServiceState) -> Callable[[], None]:
    """SIGHUP reloads the model from ``model_path`` (the usual daemon convention); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    async def reload() -> None:
        try:
            await state.reload()
        except ReloadFailed:
            pass  # logged and counted by reload(); the old model keeps serving

    def on_hup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


def _drain_on_stop_signals(state: ServiceState) -> None:
    """Turn not-ready the moment SIGTERM/SIGINT arrives, then let the server's own handler start its graceful
    shutdown (stop accepting, finish accepted requests, run the lifespan's exit)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread (not so under a TestClient)
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: object, previous: Callable = previous) -> None:
            state.begin_drain()
            previous(signum, frame)

        signal.signal(sig, handler)


async def _start_grpc(state: ServiceState, version: str):
    """The gRPC door in this event loop, sharing the state (None when ``grpc_port`` is 0). Imported here, so a
    service without it never loads grpc."""
    if not state.settings.grpc_port:
        return None
    from service.grpc_door import build_server

    server = build_server(state, version)
    await server.start()
    log.info("gRPC on %s:%d", state.settings.host, state.settings.grpc_port)
    return server


def lifespan(settings: Settings, load_model: Callable[[Settings], Model], supervised: bool = False,
             activity: Activity | None = None):
    """The ASGI lifespan: ``app.state.service`` holds the ``ServiceState`` while the app runs. ``supervised``: a
    worker of ``service.supervisor``, whose socket listens only once the lifespan has started; ``activity``: the
    workers' record of who holds images, into which this one's batcher writes."""

    @asynccontextmanager
    async def run(app) -> AsyncIterator[None]:
        state = ServiceState(settings, load_model, supervised)
        app.state.service = state
        _drain_on_stop_signals(state)
        undo_sighup = _reload_on_sighup(state)
        batcher: MicroBatcher = MicroBatcher(
            lambda model, x, alone: model.run(x, alone), state.infer_pool, settings.max_batch_size,
            settings.max_batch_delay_ms / 1000, settings.max_queue, metrics.observe_batch, metrics.QUEUE_DEPTH.set,
            max_wait_s=settings.max_queue_wait_ms / 1000, activity=activity, inline_s=settings.inline_run_ms / 1000,
        )
        batcher.start()
        state.batcher = batcher
        # Load in the background: the process answers liveness (and a 503 readiness) while it loads.
        loader = asyncio.create_task(state.load(), name="model-load")
        grpc_server = None
        try:
            if supervised:
                # A worker listens only after the lifespan's startup: waiting here for the model means the kernel
                # sends it no connection until it is ready (service.supervisor).
                await asyncio.shield(loader)
            # After that wait, as the HTTP door (workers share the gRPC port too); a taken port fails the start.
            grpc_server = await _start_grpc(state, app.version)
            yield
        finally:
            undo_sighup()
            state.begin_drain()
            if grpc_server is not None:
                # Calls in flight finish (up to drain_timeout_s), new ones are refused; the HTTP server has
                # already drained its own before running this exit.
                await grpc_server.stop(settings.drain_timeout_s)
            loader.cancel()
            await batcher.stop()
            state.decode_pool.shutdown(wait=False, cancel_futures=True)
            state.infer_pool.shutdown(wait=False, cancel_futures=True)
            state.load_pool.shutdown(wait=False, cancel_futures=True)

    return run
