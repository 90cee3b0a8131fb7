"""Dynamic micro-batching: images from concurrent requests share one ``session.run``.

Admission is decided before any decoding (``reserve``), so a full queue costs the client a 429 and the
server nothing. A batch is dispatched as soon as it is full, or when nothing more is on its way (no
reserved image is still decoding: a lone client pays no delay), or after ``max_delay_s`` at most.
Triton's dynamic batcher works the same way (max_queue_delay_microseconds, preferred sizes). A batch that is all
the work on the machine (nothing else queued or decoding here, no other worker holding images: ``activity``) is run
as ``alone``, which the model may run differently (``service.runtime.Model.run``), and, when it should take less
than ``inline_s`` at the last batch's time per image, on the event loop's own thread: the loop has nothing else to do
meanwhile, and the two thread hops to the executor and back cost a small model more than the run.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from service.activity import Activity
from service.errors import InferenceFailed, ModelNotReady, QueueFull

M = TypeVar("M")  # the model a batch ran on, so a response can name the version that answered


@dataclass
class Result(Generic[M]):
    logits: np.ndarray  # (classes,)
    model: M
    queue_s: float
    infer_s: float


@dataclass
class _Item:
    x: np.ndarray
    model: object  # the model this image was preprocessed for; a batch never mixes models
    future: asyncio.Future
    enqueued: float


class Reservation:
    """Room in the queue for ``n`` images, held while they are decoded."""

    def __init__(self, batcher: MicroBatcher, n: int) -> None:
        self.batcher, self.n = batcher, n

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self.n:
            self.batcher._incoming -= self.n
            self.n = 0
            self.batcher._publish()

    async def submit(self, xs: list[np.ndarray], model: object) -> list[Result]:
        """Queue the decoded images; resolves when their batch has run. Cancelling drops them."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Item(x, model, loop.create_future(), now) for x in xs]
        self.batcher._queue.extend(items)
        self.release()
        self.batcher._wakeup.set()
        futures = [it.future for it in items]
        try:
            if len(futures) == 1:  # most requests: no gathering future to make
                return [await futures[0]]
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:  # a cancelled (timed-out, disconnected) request leaves nothing queued
                f.cancel()
            raise


class DrainRate:
    """Images the model gets through per second of inference, over the batches of the last ``window_s``: how fast
    the queue drains while there is a queue (the batcher is then always busy). Admission and Retry-After use it."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._batches: deque[tuple[float, int, float]] = deque()  # (finished at, images, seconds)
        self._images, self._seconds = 0, 0.0

    def add(self, images: int, seconds: float, at: float) -> None:
        self._batches.append((at, images, seconds))
        self._images += images
        self._seconds += seconds
        while self._batches and self._batches[0][0] < at - self.window_s:
            _, old_images, old_seconds = self._batches.popleft()
            self._images -= old_images
            self._seconds -= old_seconds

    def per_second(self) -> float | None:
        """None until a batch has run: no rate is known, so nothing is refused on time."""
        return self._images / self._seconds if self._batches and self._seconds > 0 else None


class MicroBatcher(Generic[M]):
    def __init__(
        self,
        run: Callable[[M, np.ndarray, bool], np.ndarray],
        executor: Executor,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        max_wait_s: float = float("inf"),
        activity: Activity | None = None,
        inline_s: float = 0.0,
    ) -> None:
        self.run, self.executor = run, executor
        self.max_batch_size, self.max_delay_s, self.max_queue = max_batch_size, max_delay_s, max_queue
        self.max_wait_s = max_wait_s
        self.on_batch, self.on_depth = on_batch, on_depth
        self.activity = activity  # None: no other worker
        self.inline_s = inline_s  # 0: every batch runs on the executor
        # The last batch's model (weakly: a reloaded-away model is not kept for this) and its seconds per image.
        self._last_run: tuple[weakref.ref, float] | None = None
        self.drain = DrainRate()
        self._queue: deque[_Item] = deque()
        self._incoming = 0  # images reserved and still being decoded
        self._running = 0  # images in the batch being run
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Images admitted and not yet dispatched (decoding or queued)."""
        return len(self._queue) + self._incoming

    def expected_wait_s(self, n: int = 0) -> float:
        """How long the images admitted so far (and ``n`` more) should take to drain, at the measured rate."""
        rate = self.drain.per_second()
        return (self.depth + n) / rate if rate else 0.0

    def reserve(self, n: int) -> Reservation:
        """Room for ``n`` images, or ``QueueFull`` at once: when the queue is full, or when the images already
        admitted would take longer than ``max_wait_s`` to drain at the measured rate (an overload is refused, not
        queued into timeouts; an empty queue always admits, however slow the model)."""
        if self._task is None:
            raise ModelNotReady()
        if (refused := self.refusal(n)) is not None:
            raise refused
        self._incoming += n
        self._publish()
        return Reservation(self, n)

    def refusal(self, n: int) -> QueueFull | None:
        """The ``QueueFull`` that ``reserve(n)`` would raise now, else None (the HTTP server asks this before a
        request's body has arrived, with n = 1: a request refused for one image is refused for any number)."""
        if self.depth + n > self.max_queue or self.expected_wait_s() > self.max_wait_s:
            # Retry-After: when today's queue should have drained (at least a second: HTTP's unit).
            return QueueFull(retry_after_s=max(1.0, self.expected_wait_s()))
        return None

    def _publish(self) -> None:
        if self.activity is not None:
            self.activity.publish(len(self._queue) + self._incoming + self._running)

    def _nothing_else(self, incoming: int) -> bool:
        """Nothing queued here, only ``incoming`` images decoding, and no image in another worker."""
        return not self._queue and self._incoming == incoming and (self.activity is None or self.activity.others_idle())

    def _alone(self) -> bool:
        """The batch about to run is all the work: none left queued or decoding here, none in another worker."""
        return self._nothing_else(0)

    def idle(self, n: int) -> bool:
        """The ``n`` images just reserved are all the work: nothing else queued, decoding or running here, and no
        other worker holding images."""
        return self._running == 0 and self._nothing_else(n)

    def _short(self, n: int, model: object) -> bool:
        """A batch of ``n`` images should take less than ``inline_s``, at the time per image of the last batch, if
        that ran the same model (a reload to a slower one is not run on the loop on the old one's rate)."""
        if self._last_run is None or self._last_run[0]() is not model:
            return False
        return n * self._last_run[1] < self.inline_s

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(ModelNotReady())

    def _take(self, n: int, model: object = None) -> list[_Item]:
        """Up to n live items for one model (the first live item's, unless given)."""
        out: list[_Item] = []
        while self._queue and len(out) < n:
            item = self._queue[0]
            if item.future.done():  # its request was cancelled (timed out, disconnected): drop it
                self._queue.popleft()
                continue
            if model is None:
                model = item.model
            elif item.model is not model:  # a reload happened: the next batch runs the new model
                break
            out.append(self._queue.popleft())
        return out

    async def _gather_batch(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = self._take(self.max_batch_size)
        deadline = loop.time() + self.max_delay_s
        while len(batch) < self.max_batch_size and self._incoming > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
            if batch:
                batch += self._take(self.max_batch_size - len(batch), batch[0].model)
            else:
                batch = self._take(self.max_batch_size)
        return batch

    def _stack_and_run(self, model: M, xs: list[np.ndarray], alone: bool) -> np.ndarray:
        # Stacked where the batch runs, off the loop unless it is short: 32 images at 224x224 are a 19 MB copy (ms).
        return self.run(model, np.stack(xs), alone)  # (N, C, H, W)

    async def _loop(self) -> None:
        while True:
            batch = await self._gather_batch()
            if self.on_depth is not None:
                self.on_depth(self.depth)
            if not batch:
                self._publish()  # what it dropped was cancelled
                continue
            await self._run_batch(batch)
            # No reference to the batch's model outlives its batch here: after a reload the old model is freed
            # with its last request, not held by an idle batcher until the next one.
            del batch

    async def _run_batch(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        model = batch[0].model
        self._running = len(batch)
        alone = self._alone()
        xs = [it.x for it in batch]
        start = time.perf_counter()
        try:
            if alone and self._short(len(batch), model):
                logits = self._stack_and_run(model, xs, alone)
            else:
                logits = await loop.run_in_executor(self.executor, self._stack_and_run, model, xs, alone)
        except asyncio.CancelledError:
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(ModelNotReady())
            raise
        except Exception as e:  # noqa: BLE001 - the failure belongs to this batch's requests only
            for it in batch:
                if not it.future.done():
                    err = InferenceFailed()
                    err.__cause__ = e
                    it.future.set_exception(err)
            return
        finally:
            self._running = 0
            self._publish()
        infer_s = time.perf_counter() - start
        self._last_run = (weakref.ref(model), infer_s / len(batch))
        self.drain.add(len(batch), infer_s, start + infer_s)
        if self.on_batch is not None:
            self.on_batch(len(batch), infer_s)
        for i, it in enumerate(batch):
            if not it.future.done():
                it.future.set_result(Result(logits[i], model, start - it.enqueued, infer_s))
