"""Prometheus metrics: module-level, with fixed label sets (route templates, never raw paths)."""

from __future__ import annotations

import os

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


def observe_batch(size: int, seconds: float) -> None:
    BATCH_SIZE.observe(size)
    INFERENCE.observe(seconds)
    IMAGES.inc(size)


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
