"""The protocol-neutral core: model state and its lifecycle, and classification (decode -> preprocess ->
micro-batched inference) with the limits every door shares, the deadline, and cancellation when the client
goes away. Doors (REST, the Open Inference Protocol) are thin: they read a request into plain values, call
this, and shape the answer. Nothing here knows a web framework."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import metrics
from service.batching import MicroBatcher, Result
from service.errors import (
    ClientGone,
    DeadlineExceeded,
    ModelLoadError,
    ModelLoadFailed,
    ModelNotReady,
    ReloadFailed,
    ServiceError,
    TooManyImages,
)
from service.preprocessing import INLINE_BYTES, ImageInput, Preprocessor
from service.runtime import Model
from service.settings import Settings

log = logging.getLogger("service")


def lower_priority(steps: int) -> Callable[[], None]:
    """A thread initializer: the thread runs ``steps`` nice levels below the process, and so do the threads it
    starts (Linux threads inherit it), such as onnxruntime's pool, made with the session on the loading thread."""

    def initializer() -> None:
        if steps <= 0 or sys.platform != "linux":  # elsewhere PRIO_PROCESS takes a process, not a thread
            return
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
        except OSError as e:  # a sandbox may forbid it; the threads then share the loop's priority
            log.warning("could not lower the priority of thread %s: %s", threading.current_thread().name, e)

    return initializer


@dataclass(frozen=True)
class Pipeline:
    """A model and the preprocessing its file describes: swapped together, atomically."""

    model: Model
    preprocessor: Preprocessor


class ServiceState:
    """Everything the lifespan builds; each door reaches it its own way."""

    def __init__(self, settings: Settings, load_model: Callable[[Settings], Model], supervised: bool = False) -> None:
        self.settings = settings
        self.load_model = load_model
        self.supervised = supervised  # one of service.supervisor's workers, which share the ports
        self.serving: Pipeline | None = None
        self.status = "loading"
        self.reason: str | None = "model is loading"
        self.batcher: MicroBatcher | None = None
        below_loop = lower_priority(settings.compute_nice)
        self.decode_pool = ThreadPoolExecutor(settings.effective_decode_threads, "decode", below_loop)
        self.infer_pool = ThreadPoolExecutor(1, "infer", below_loop)
        # Reloads load beside the serving model (not on infer_pool, which keeps running batches), at its priority.
        self.load_pool = ThreadPoolExecutor(1, "load", below_loop)
        self._reload_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def require_ready(self) -> Pipeline:
        if self.status == "failed":
            raise ModelLoadFailed(self.reason or "unknown reason")
        if not self.ready or self.serving is None:
            raise ModelNotReady()
        return self.serving

    def require_batcher(self) -> MicroBatcher:
        if self.batcher is None:
            raise ModelNotReady()
        return self.batcher

    def begin_drain(self) -> None:
        if self.status != "draining":
            log.info("draining: readiness now 503, finishing accepted requests")
        self.status, self.reason = "draining", "shutting down"

    def _load_and_warm(self) -> Pipeline:
        model = self.load_model(self.settings)
        model.warm_up(self.settings.max_batch_size)
        return Pipeline(model, Preprocessor(model.spec, self.settings.max_image_pixels))

    async def load(self) -> None:
        # Under the reload lock: a reload asked for while the first load warms up (a SIGHUP that reaches a worker
        # still starting) runs after it, on the file as it is then, instead of being overwritten by it.
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            try:
                serving = await loop.run_in_executor(self.infer_pool, self._load_and_warm)
            except ModelLoadError as e:
                self._fail(str(e))
                return
            except Exception as e:  # noqa: BLE001 - any failure must leave the service up and not ready
                log.exception("model load failed unexpectedly")
                self._fail(f"unexpected error while loading the model: {type(e).__name__}: {e}")
                return
            self.serving = serving
            spec = serving.model.spec
            metrics.MODEL_LOADS.labels("ok").inc()
            metrics.serving(spec.name, spec.version, serving.model.provider)
            if self.status == "loading":
                self.status, self.reason = "ready", None
                log.info("ready: %s %s on %s", spec.name, spec.version, serving.model.provider)

    async def reload(self) -> Pipeline:
        """Load and warm the file at ``model_path`` beside the serving model, then swap atomically.
        Requests already queued finish on the model they were preprocessed for. A bad file leaves the
        old model serving."""
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            try:
                serving = await loop.run_in_executor(self.load_pool, self._load_and_warm)
            except Exception as e:  # noqa: BLE001 - whatever broke, the old model keeps serving
                metrics.MODEL_LOADS.labels("failed").inc()
                log.error("reload failed, still serving %s: %s", self._version(), e)
                raise ReloadFailed() from e
            old = self._version()
            self.serving = serving
            spec = serving.model.spec
            metrics.MODEL_LOADS.labels("ok").inc()
            metrics.serving(spec.name, spec.version, serving.model.provider)
            if self.status == "failed":  # the file was fixed: become ready
                self.status, self.reason = "ready", None
            log.info("reloaded: %s -> %s on %s", old, spec.version, serving.model.provider)
            return serving

    def _version(self) -> str | None:
        return self.serving.model.spec.version if self.serving else None

    def _fail(self, reason: str) -> None:
        metrics.MODEL_LOADS.labels("failed").inc()
        log.error("model not served: %s", reason)
        if self.status == "loading":
            self.status, self.reason = "failed", reason


@dataclass
class Classification:
    images: list[ImageInput]  # empty when the client sent tensors
    results: list[Result]  # one per image, in request order

    @property
    def model(self) -> Model:
        """The model that answered (a reload between two requests' batches can change it)."""
        return self.results[0].model

    @property
    def logits(self) -> np.ndarray:
        if len(self.results) == 1:
            return self.results[0].logits[None]  # a view: most requests carry one image
        return np.stack([r.logits for r in self.results])  # (N, classes) float32

    def observe(self, seconds: float) -> None:
        """Into the metrics and the statistics, once answered; ``seconds`` from admission to answer."""
        for d in self.images:
            metrics.DECODE.observe(d.decode_s)
            metrics.PREPROCESS.observe(d.preprocess_s)
        for r in self.results:
            metrics.QUEUE_WAIT.observe(r.queue_s)
        stats = metrics.STATISTICS
        stats.success.add(seconds)
        stats.queue.add(max(r.queue_s for r in self.results))
        stats.compute_input.add(sum(d.decode_s + d.preprocess_s for d in self.images))
        stats.compute_infer.add(max(r.infer_s for r in self.results))

    def server_timing(self, started: float) -> str:
        """The stages as a Server-Timing header (ms): decode and preprocess summed over images."""
        decode = sum(d.decode_s for d in self.images) * 1000
        pre = sum(d.preprocess_s for d in self.images) * 1000
        queue = max(r.queue_s for r in self.results) * 1000
        infer = max(r.infer_s for r in self.results) * 1000
        total = (time.perf_counter() - started) * 1000
        return (f"decode;dur={decode:.3f}, preprocess;dur={pre:.3f}, queue;dur={queue:.3f}, "
                f"infer;dur={infer:.3f}, total;dur={total:.3f}")


def _admit(state: ServiceState, n: int) -> tuple[Pipeline, MicroBatcher]:
    """The checks every door shares before any work: ready, and within the per-request image limit."""
    pipeline, batcher = state.require_ready(), state.require_batcher()
    if n > state.settings.max_batch_images:
        raise TooManyImages(state.settings.max_batch_images)
    return pipeline, batcher


async def classify_images(state: ServiceState, images: list[bytes], gone: Awaitable[None] | None = None
                          ) -> Classification:
    """Encoded images -> logits: decode and preprocess off the event loop, then micro-batched inference.
    ``gone`` resolves if the client goes away: the request is then abandoned and its queued images dropped."""
    pipeline, batcher = _admit(state, len(images))
    loop = asyncio.get_running_loop()
    pre = pipeline.preprocessor

    async def decode_all() -> list[ImageInput]:
        # Small images are finished right here, in order; only the rest become futures on the decode pool
        # (no task per image: for a multipart request of 32 digits the tasks cost more than the decoding). A lone
        # request's mid-sized baseline JPEG is finished here too while it is all the work.
        decoded: list[ImageInput | asyncio.Future] = []
        try:
            for data in images:
                idle = len(images) == 1 and pre.opens_when_idle(data) and batcher.idle(1)
                if len(data) > INLINE_BYTES and not idle:
                    decoded.append(loop.run_in_executor(state.decode_pool, pre, data))
                    continue
                header = pre.open(data)  # header only: bad and oversized images are refused before decoding
                inline = pre.inline_when_idle(header) if idle else pre.inline(header)
                decoded.append(pre.finish(header) if inline
                               else loop.run_in_executor(state.decode_pool, pre.finish, header))
        except ServiceError as e:
            cancel(decoded)
            raise numbered(e, len(decoded)) from e.__cause__  # the image being opened when it failed
        except BaseException:
            cancel(decoded)
            raise
        pending = [d for d in decoded if isinstance(d, asyncio.Future)]
        if not pending:
            return decoded
        try:
            done = iter(await asyncio.gather(*pending))
        except ServiceError as e:
            cancel(decoded)
            failed = (i for i, d in enumerate(decoded)
                      if isinstance(d, asyncio.Future) and d.done() and not d.cancelled() and d.exception() is e)
            raise numbered(e, next(failed, None)) from e.__cause__
        return [next(done) if isinstance(d, asyncio.Future) else d for d in decoded]

    def cancel(decoded: list[ImageInput | asyncio.Future]) -> None:
        for d in decoded:  # a bad image fails the request: its siblings' results are not wanted
            if isinstance(d, asyncio.Future):
                d.cancel()

    def numbered(e: ServiceError, index: int | None) -> ServiceError:
        """Which image of several failed, 1-based, so a client can find it in its batch."""
        return e.about(f"image {index + 1} of {len(images)}") if len(images) > 1 and index is not None else e

    async def decode_and_infer() -> Classification:
        with batcher.reserve(len(images)) as reservation:
            inputs = await decode_all()
            results = await reservation.submit([d.x for d in inputs], pipeline.model)
        return Classification(inputs, results)

    return await guarded(state, gone, decode_and_infer())


async def classify_tensors(state: ServiceState, x: np.ndarray, gone: Awaitable[None] | None = None
                           ) -> Classification:
    """Preprocessed input (N, C, H, W), in the model's input dtype -> logits, through the same micro-batcher."""
    pipeline, batcher = _admit(state, len(x))

    async def infer() -> Classification:
        with batcher.reserve(len(x)) as reservation:
            results = await reservation.submit(list(x), pipeline.model)
        return Classification([], results)

    return await guarded(state, gone, infer())


# A request answered sooner than this never starts the task that watches for its client leaving: for small
# requests that task (and asyncio.wait around it) cost more than the work (docs/throughput.md#per-request-cost).
WATCH_AFTER_S = 0.005


async def guarded(state: ServiceState, gone: Awaitable[None] | None,
                  work: Coroutine[Any, Any, Classification]) -> Classification:
    """Run ``work`` within the request deadline (``DeadlineExceeded``), and abandon it, dropping its queued
    images, if ``gone`` resolves first (``ClientGone``). ``work`` runs in the caller's task, under
    ``asyncio.timeout``; ``gone`` is awaited only once the request has taken ``WATCH_AFTER_S``."""
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    watcher: asyncio.Task | None = None
    left = finished = False

    def on_gone(w: asyncio.Task) -> None:
        nonlocal left
        if not finished and not w.cancelled() and w.exception() is None:
            left = True
            task.cancel()  # into ``work``: its reservation is released and its queued images dropped

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(gone)
        watcher.add_done_callback(on_gone)

    timer = loop.call_later(WATCH_AFTER_S, watch) if gone is not None else None
    try:
        async with asyncio.timeout(state.settings.request_timeout_ms / 1000) as deadline:
            classification = await work
    except BaseException as e:
        metrics.STATISTICS.fail.add(time.perf_counter() - started)
        if isinstance(e, TimeoutError) and deadline.expired():
            raise DeadlineExceeded() from None
        if isinstance(e, asyncio.CancelledError) and left and task.uncancel() == 0:
            raise ClientGone() from None  # cancelled by on_gone alone (a door cancelled as well: re-raised)
        raise
    finally:
        finished = True
        if timer is not None:
            timer.cancel()
        if watcher is not None:
            watcher.cancel()
        elif gone is not None and asyncio.iscoroutine(gone):
            gone.close()  # never started: closed, so it is not reported as never awaited
    classification.observe(time.perf_counter() - started)
    return classification
