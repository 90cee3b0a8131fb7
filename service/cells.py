"""One int64 a worker in a file all of a supervisor's workers map: the shape of ``service.balance``'s connection
shares and of ``service.activity``'s record of who holds images. Each worker writes only its own cell, from its
event loop; an aligned 8-byte store is atomic on the CPUs we run on, and the readers tolerate a moment's staleness."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path


class WorkerCells:
    INITIAL = 0  # every cell when the supervisor creates the file
    VACANT = 0  # a dead worker's cell, until its replacement writes it

    def __init__(self, path: Path, index: int) -> None:
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), 0)
        self.cells = memoryview(self.map).cast("q")
        self.index = index

    @classmethod
    def create(cls, path: Path, workers: int) -> None:
        path.write_bytes(struct.pack(f"{workers}q", *[cls.INITIAL] * workers))

    @classmethod
    def vacate(cls, path: Path, index: int) -> None:
        """Worker ``index`` died (the supervisor's call): what its cell said is gone with it."""
        with open(path, "r+b") as f:
            f.seek(8 * index)
            f.write(struct.pack("q", cls.VACANT))
