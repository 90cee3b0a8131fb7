"""Equal shares of the connections for the workers of ``service.supervisor``.

Each worker listens on its own ``SO_REUSEPORT`` socket and the kernel hashes every new connection to one of them,
so two keep-alive clients land on the same worker half the time while another worker idles
(docs/throughput.md#connection-shares-2026-12-03). A worker that holds more than its share of the open connections
answers the next request on one of them with ``Connection: close`` (RFC 9112 section 9.6): the client opens a new
one, which the kernel hashes anew, until no worker holds more than ceil(connections / listening workers). Envoy's
"exact" connection balance decides the same at accept time, which ``SO_REUSEPORT`` leaves to the kernel.
"""

from __future__ import annotations

from pathlib import Path

from service.cells import WorkerCells

NOT_LISTENING = -1  # a worker still loading its model, draining, or dead and not yet replaced: no share to take


class ConnectionShares(WorkerCells):
    """A worker's cell: its open connections that are staying, or ``NOT_LISTENING``; a read a moment stale only
    delays a close to the next request."""

    INITIAL = VACANT = NOT_LISTENING

    def __init__(self, path: Path, index: int) -> None:
        super().__init__(path, index)
        self.leaving = 0  # this worker's connections told to close that are still open
        self.listening = False

    def listen(self, connections: int) -> None:
        self.listening = True
        self.publish(connections)

    def publish(self, connections: int) -> None:
        if self.listening:
            self.cells[self.index] = connections - self.leaving

    def stop_listening(self) -> None:
        self.listening = False
        self.cells[self.index] = NOT_LISTENING

    def over_share(self) -> bool:
        """This worker holds more connections than ceil(all of them / the workers listening)."""
        counts = [c for c in self.cells if c != NOT_LISTENING]
        mine = self.cells[self.index]
        return len(counts) > 1 and mine > -(-sum(counts) // len(counts))
