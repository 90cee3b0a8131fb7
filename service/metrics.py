"""Prometheus metrics: module-level, with fixed label sets (route templates, never raw paths)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

# One series per counter and histogram, not two: a `_created` timestamp beside each is noise on a dashboard.
disable_created_metrics()

# Every name starts resnet_serve_, so the service's series cannot collide with others in a shared Prometheus.
NAMESPACE = "resnet_serve"

# Sub-millisecond to seconds: a 32x32 PNG decodes in 50 us, a 12 MP JPEG in tens of ms, a batch of
# resnet50 on the CPU in seconds.
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

REQUESTS = Counter("http_requests", "HTTP requests answered", ["route", "method", "status"], namespace=NAMESPACE)
REQUEST_LATENCY = Histogram("http_request_duration_seconds", "Time to answer", ["route"], buckets=STAGE_BUCKETS,
                            namespace=NAMESPACE)
DECODE = Histogram("predict_decode_seconds", "Image decode time, per image", buckets=STAGE_BUCKETS,
                   namespace=NAMESPACE)
PREPROCESS = Histogram("predict_preprocess_seconds", "Resize and normalise time, per image", buckets=STAGE_BUCKETS,
                       namespace=NAMESPACE)
QUEUE_WAIT = Histogram("predict_queue_wait_seconds", "Time an image waited for its batch", buckets=STAGE_BUCKETS,
                       namespace=NAMESPACE)
INFERENCE = Histogram("predict_inference_seconds", "session.run time, per batch", buckets=STAGE_BUCKETS,
                      namespace=NAMESPACE)
BATCH_SIZE = Histogram("predict_batch_size", "Images per session.run", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                       namespace=NAMESPACE)
QUEUE_DEPTH = Gauge("predict_queue_depth", "Images admitted and not yet dispatched to the model",
                    multiprocess_mode="livesum", namespace=NAMESPACE)
IMAGES = Counter("predict_images", "Images classified", namespace=NAMESPACE)
# A gauge, not an Info: Info does not aggregate over worker processes. 1 for each model some worker serves.
MODEL_INFO = Gauge("model_info", "The model being served", ["name", "version", "provider"], multiprocess_mode="max",
                   namespace=NAMESPACE)
MODEL_LOADS = Counter("model_loads", "Model load attempts", ["result"], namespace=NAMESPACE)
GRPC_REQUESTS = Counter("grpc_requests", "gRPC calls answered", ["method", "code"], namespace=NAMESPACE)
GRPC_LATENCY = Histogram("grpc_request_duration_seconds", "Time to answer a gRPC call", ["method"],
                         buckets=STAGE_BUCKETS, namespace=NAMESPACE)


DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer")
MAX_BATCH = 4096  # Settings.max_batch_size's bound: one (count, ns) pair per batch size
# One row of int64 cells per process: inference_count, execution_count, last_inference_ms, then (count, ns) for each
# duration, then for each batch size.
INFERENCE_COUNT, EXECUTION_COUNT, LAST_INFERENCE = 0, 1, 2
FIRST_DURATION = 3
FIRST_BATCH = FIRST_DURATION + 2 * len(DURATIONS)
CELLS = FIRST_BATCH + 2 * MAX_BATCH


class Duration:
    """A (count, ns) pair of cells in this process's row."""

    def __init__(self, stats: InferenceStatistics, cell: int) -> None:
        self.stats, self.cell = stats, cell

    def add(self, seconds: float) -> None:
        own, cell = self.stats.own, self.cell
        own[cell] += 1
        own[cell + 1] += round(seconds * 1e9)


@dataclass
class Figures:
    """The statistics summed over every process that serves (for Triton's statistics extension)."""

    inference_count: int
    execution_count: int
    last_inference_ms: int
    durations: dict[str, dict[str, int]]  # name -> {"count", "ns"}
    batches: dict[int, dict[str, int]]  # batch size -> {"count", "ns"} of its session.runs


class InferenceStatistics:
    """The figures of Triton's statistics extension, since the service started, from what the core and the batcher
    already measure. Each process counts into its own row of cells, updated on its event loop only; under the
    supervisor the rows are one shared file (``attach``), so any worker answers for all of them, as ``/metrics``
    does."""

    def __init__(self) -> None:
        self.rows = np.zeros((1, CELLS), np.int64)
        self.own = self.rows[0]
        for i, name in enumerate(DURATIONS):
            setattr(self, name, Duration(self, FIRST_DURATION + 2 * i))

    def attach(self, path: Path, index: int) -> None:
        """Count into row ``index`` of the shared file ``path`` (made by ``create``); a replaced worker continues
        its predecessor's row, so the figures stay totals since the service started."""
        self.rows = np.memmap(path, np.int64, mode="r+").reshape(-1, CELLS)
        self.own = self.rows[index]

    @staticmethod
    def create(path: Path, processes: int) -> None:
        np.zeros((processes, CELLS), np.int64).tofile(path)

    def batch(self, size: int, seconds: float) -> None:
        own = self.own
        cell = FIRST_BATCH + 2 * (min(size, MAX_BATCH) - 1)
        own[cell] += 1
        own[cell + 1] += round(seconds * 1e9)
        own[EXECUTION_COUNT] += 1
        own[INFERENCE_COUNT] += size
        own[LAST_INFERENCE] = time.time_ns() // 1_000_000

    def figures(self) -> Figures:
        total = self.rows.sum(axis=0)
        durations = total[FIRST_DURATION:FIRST_BATCH].reshape(-1, 2).tolist()
        batches = total[FIRST_BATCH:].reshape(-1, 2).tolist()
        return Figures(
            int(total[INFERENCE_COUNT]), int(total[EXECUTION_COUNT]), int(self.rows[:, LAST_INFERENCE].max()),
            {name: {"count": c, "ns": ns} for name, (c, ns) in zip(DURATIONS, durations, strict=True)},
            {size: {"count": c, "ns": ns} for size, (c, ns) in enumerate(batches, start=1) if c},
        )


STATISTICS = InferenceStatistics()


def observe_batch(size: int, seconds: float) -> None:
    BATCH_SIZE.observe(size)
    INFERENCE.observe(seconds)
    IMAGES.inc(size)
    STATISTICS.batch(size, seconds)


_served: list[tuple[str, str, str]] = []


def serving(name: str, version: str, provider: str) -> None:
    """The model this process now serves (the one it served before, if any, no longer)."""
    for old in _served:
        MODEL_INFO.labels(*old).set(0)
    _served[:] = [(name, version, provider)]
    MODEL_INFO.labels(name, version, provider).set(1)


def exposition() -> bytes:
    """The text format: this process's metrics, or every worker's under the supervisor."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return generate_latest()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)
