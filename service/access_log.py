"""The access log: one line per HTTP request once it is answered (client, method, path, status, duration), on
the ``service.access`` logger. ``create_app`` installs it outermost when ``settings.access_log`` is on, so
``POST /predict`` (answered ahead of FastAPI by ``service.predict``) is logged like every other route.

    2026-12-02 08:30:00,123 INFO service.access: 127.0.0.1:50412 POST /predict 200 3.1ms

On the event loop a line costs only its record; ``BackgroundWriter`` formats and writes the records a few
times a second, from a thread, so neither formatting nor a slow terminal or pipe holds up requests
(docs/throughput.md#access-log).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from logging.handlers import QueueHandler

from starlette.types import Scope

from service.http import AnsweredRequests

log = logging.getLogger("service.access")


FORMAT = "%s %s %s %d %.1fms"


def record(client: tuple[str, int] | None, method: str, path: str, status: int, seconds: float) -> None:
    """One request's line (also for those the HTTP server answers itself, ``service.server``)."""
    if not log.isEnabledFor(logging.INFO):
        return
    args = (f"{client[0]}:{client[1]}" if client else "-", method, path, status, seconds * 1000)
    writer = BackgroundWriter.running
    if writer is None:
        log.info(FORMAT, *args)
    else:  # even the record is built by the writer: the loop only queues the line's values and the time
        writer.records.put((time.time(), args))


class AccessLog(AnsweredRequests):
    def answered(self, scope: Scope, status: int, seconds: float) -> None:
        record(scope.get("client"), scope["method"], scope["path"], status, seconds)


class Handoff(QueueHandler):
    """Puts the record on the queue as it is: QueueHandler's own ``prepare`` formats it first (for other
    processes), which is the work handed to the writer."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class BackgroundWriter:
    """Hands ``logger``'s records to the root logger's handlers from a thread that wakes every ``interval_s``.

    Unlike logging's QueueListener, whose thread wakes on every record (a thread switch per request), this
    one collects what arrived since its last turn. ``stop`` writes what is still queued.
    """

    running: BackgroundWriter | None = None  # the one started for ``log``, which ``AccessLog`` hands lines to

    def __init__(self, logger: logging.Logger = log, interval_s: float = 0.1) -> None:
        self.logger, self.interval_s = logger, interval_s
        # Records logged through the logger, and (time, args) of AccessLog's lines.
        self.records: queue.SimpleQueue[logging.LogRecord | tuple[float, tuple]] = queue.SimpleQueue()
        self.handoff = Handoff(self.records)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="access-log", daemon=True)

    def start(self) -> BackgroundWriter:
        self.logger.addHandler(self.handoff)
        self.logger.propagate = False
        self.thread.start()
        if self.logger is log:
            BackgroundWriter.running = self
        return self

    def stop(self) -> None:
        if BackgroundWriter.running is self:
            BackgroundWriter.running = None
        self.logger.removeHandler(self.handoff)
        self.logger.propagate = True
        self.stopping.set()
        self.thread.join()

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            self.write()
        self.write()

    def write(self) -> None:
        handlers = logging.getLogger().handlers
        while True:
            try:
                record = self.records.get_nowait()
            except queue.Empty:
                return
            if isinstance(record, tuple):
                record = self.line(*record)
            for handler in handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)

    def line(self, at: float, args: tuple) -> logging.LogRecord:
        """AccessLog's line as the record ``log.info`` would have made, stamped with the time it was answered."""
        record = self.logger.makeRecord(self.logger.name, logging.INFO, __file__, 0, FORMAT, args, None)
        record.created, record.msecs = at, int((at - int(at)) * 1000) + 0.0
        record.relativeCreated = (at - logging._startTime) * 1000  # as LogRecord computes it
        return record
