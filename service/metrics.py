"""Prometheus metrics: module-level, with fixed label sets (route templates, never raw paths)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

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


@dataclass
class Duration:
    count: int = 0
    ns: int = 0  # summed over count

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += round(seconds * 1e9)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class InferenceStatistics:
    """The figures of Triton's statistics extension, since the process started, from what the core and the
    batcher already measure. Updated on the event loop only."""

    inference_count: int = 0  # images classified
    execution_count: int = 0  # batches run
    last_inference_ms: int = 0  # ms since the epoch
    success: Duration = field(default_factory=Duration)  # per request: admitted to answered
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)  # per request: its longest-waiting image
    compute_input: Duration = field(default_factory=Duration)  # per request: decode and preprocess, summed
    compute_infer: Duration = field(default_factory=Duration)  # per request: its batch's session.run
    batches: dict[int, Duration] = field(default_factory=dict)  # session.run time by batch size

    def durations(self) -> dict[str, Duration]:
        return {"success": self.success, "fail": self.fail, "queue": self.queue,
                "compute_input": self.compute_input, "compute_infer": self.compute_infer}

    def batch(self, size: int, seconds: float) -> None:
        self.batches.setdefault(size, Duration()).add(seconds)
        self.execution_count += 1
        self.inference_count += size
        self.last_inference_ms = time.time_ns() // 1_000_000


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
