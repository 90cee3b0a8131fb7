"""Which workers have inference work, so that a worker can tell when its batch is all the work on the machine.

onnxruntime's threads answer a lone client's batch fastest when they spin through its run instead of sleeping
between its parallel sections; when other work shares the cores, the spinning takes the CPU that work needs
(docs/throughput.md#spinning-for-a-lone-batch-2026-12-04). Each worker's micro-batcher keeps the images it holds
(admitted, queued or running) in its own cell of a file all workers map, beside ``service.balance``'s.
"""

from __future__ import annotations

from pathlib import Path

from service.cells import WorkerCells

NO_WORKER = -1  # a dead worker's cell until it is replaced: no work


class Activity(WorkerCells):
    """A worker's cell: the images its batcher holds; a read a moment stale costs one batch the other session.
    Without a file (one worker, no supervisor) there is no other worker to ask."""

    VACANT = NO_WORKER

    def __init__(self, path: Path | None = None, index: int = 0) -> None:
        if path is not None:
            super().__init__(path, index)
        else:
            self.cells, self.index = memoryview(bytearray(8)).cast("q"), 0

    def publish(self, images: int) -> None:
        self.cells[self.index] = images

    def others_idle(self) -> bool:
        """No other worker holds an image."""
        return all(c <= 0 for i, c in enumerate(self.cells) if i != self.index)
