"""Which workers have inference work, so that a worker can tell when its batch is all the work on the machine.

onnxruntime's threads answer a lone client's batch fastest when they spin through its run instead of sleeping
between its parallel sections; when other work shares the cores, the spinning takes the CPU that work needs
(docs/throughput.md#spinning-for-a-lone-batch-2026-12-04). Each worker's micro-batcher keeps the images it holds
(admitted, queued or running) in its own cell of a file all workers map, beside ``service.balance``'s.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

NO_WORKER = -1  # a dead worker's cell until it is replaced: no work


class Activity:
    """One int64 a worker: the images its batcher holds. Each worker writes only its own cell, from its event loop;
    an aligned 8-byte store is atomic on the CPUs we run on, and a read a moment stale costs one batch the other
    session. Without a file (one worker, no supervisor) there is no other worker to ask."""

    def __init__(self, path: Path | None = None, index: int = 0) -> None:
        self.index = index
        if path is None:
            self.cells = memoryview(bytearray(8)).cast("q")
            return
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), 0)
        self.cells = memoryview(self.map).cast("q")

    @staticmethod
    def create(path: Path, workers: int) -> None:
        path.write_bytes(struct.pack(f"{workers}q", *[0] * workers))

    @staticmethod
    def vacate(path: Path, index: int) -> None:
        """Worker ``index`` died (the supervisor's call): the images it held are gone with it."""
        with open(path, "r+b") as f:
            f.seek(8 * index)
            f.write(struct.pack("q", NO_WORKER))

    def publish(self, images: int) -> None:
        self.cells[self.index] = images

    def others_idle(self) -> bool:
        """No other worker holds an image."""
        return all(c <= 0 for i, c in enumerate(self.cells) if i != self.index)
