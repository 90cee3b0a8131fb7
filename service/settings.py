"""The service's one settings class. Built explicitly (``Settings()`` reads ``RESNET_*`` variables);
nothing reads the environment at import time."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default.onnx"
BOOLEAN = TypeAdapter(bool)


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPU limit of this process's cgroup, in whole cores rounded up (None: unlimited or unknown). A container's
    limit (``docker run --cpus``, a pod's ``limits.cpu``) leaves every core of the host in the affinity mask."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
    except (OSError, ValueError):
        try:  # cgroup v1
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max"
        return None
    return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, narrowed by its cgroup's CPU limit."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    return min(cores, quota) if quota else cores


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RESNET_", env_file=None, extra="ignore")

    # model
    model_path: Path = Field(DEFAULT_MODEL, description="ONNX file to serve; everything else is read from it")
    # The deployment names the model, not the file (as in KServe and Triton): a re-export or a hot reload of
    # another file keeps the URL clients use; the file's own name stays in /model's metadata.
    model_name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                            description="the model's name in responses and in the V2 URLs (/v2/models/<name>)")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA if it really works, else CPU; cuda: never ready without CUDA; cpu"
    )
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime CPU threads per inference of batches that share "
                                  "the machine (0 = this worker's share of the usable cores)")
    # Spinning, even only during runs, took CPU the event loops needed under load, and a sleeping pool made a lone
    # client wait for its threads to wake: alone does each where it pays
    # (docs/throughput.md#spinning-for-a-lone-batch-2026-12-04).
    ort_spinning: Literal["off", "in_run", "on", "alone"] = Field(
        "alone", description="onnxruntime's threads spin while waiting for work: off; in_run: only during a "
        "session.run, stopped when it returns; on: also between runs (onnxruntime's default); alone: in_run for a "
        "batch that is all the work on the machine, off otherwise (a second session of the model)"
    )
    cuda_device_id: int = Field(0, ge=0)
    # Off: TF32 moves float32 answers away from the CPU's (docs/throughput.md#on-a-gpu).
    cuda_tf32: bool = Field(False, description="let cuDNN use TF32 tensor cores for float32 convolutions")
    io_binding: Literal["auto", "on", "off"] = Field(
        "auto", description="onnxruntime IO binding (auto: on with CUDA, where it saves a copy per batch)"
    )
    # HTTP server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(8001, ge=0, le=65535, description="the Open Inference Protocol over gRPC (0: off)")
    # One per core: each process's Python (HTTP, decoding, batching) runs on one core at a time, and one worker
    # per core served the most here (docs/throughput.md#defaults).
    workers: int = Field(0, ge=0, le=64, description="worker processes, each with its own session "
                         "(service.supervisor; 0 = one per usable core)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = Field(True, description="one line per request (client, method, path, status, duration)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long accepted requests may finish")
    body_timeout_s: float = Field(30.0, gt=0, description="longest time a request body may take to arrive (408)")
    ui_enabled: bool = Field(True, description="serve the page at / that tries the model in a browser (off: 404)")
    # limits
    # Node's and h11's default; nginx allows 32 KiB in four buffers. Clients of this service send a few hundred bytes.
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request line and headers (431 past it)")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="request body limit, enforced while reading")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height limit, checked before decoding")
    max_batch_images: int = Field(64, ge=1, description="image parts accepted in one multipart request")
    # batching and backpressure
    max_batch_size: int = Field(32, ge=1, le=4096, description="images in one session.run")
    max_batch_delay_ms: float = Field(2.0, ge=0, description="longest wait for more images to fill a batch")
    # Handing a lone batch to the inference thread and back is two thread wake-ups, which cost a small model more
    # than the loop's wait (docs/throughput.md#a-lone-batch-on-the-event-loop-2026-12-04-evening).
    inline_run_ms: float = Field(
        2.0, ge=0, description="a batch that is all the work on the machine and should take less than this (at the "
        "last batch's time per image) runs on the event loop's thread (0: never)"
    )
    max_queue: int = Field(512, ge=1, description="images waiting for inference before 429")
    max_queue_wait_ms: float = Field(
        5000, gt=0, description="429 at once when admitted images would wait longer than this at the measured rate"
    )
    request_timeout_ms: float = Field(10_000, gt=0, description="per-request deadline (504 past it)")
    decode_threads: int = Field(0, ge=0, description="threads decoding images per worker (0 = its share of the "
                                "usable cores)")
    # Under overload the event loop must win the CPU: it accepts connections and answers the excess 429 at once,
    # where at equal priority the excess waits in the kernel's accept queue (docs/bench/open-loop.md#priority).
    compute_nice: int = Field(6, ge=0, le=19, description="nice steps below the event loop for the decoding and "
                              "inference threads (Linux; 0 = the same priority)")
    # access
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated; when set, /predict, /model, V2 inference/metadata and admin need "
        "'Authorization: Bearer <key>'",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("api_keys")
    @classmethod
    def _keys_are_strong(cls, v: list[SecretStr]) -> list[SecretStr]:
        for key in v:
            if len(key.get_secret_value()) < 16:
                raise ValueError("every API key needs at least 16 characters")
        return v

    @field_validator("ort_spinning", mode="before")
    @classmethod
    def _spinning_from_a_boolean(cls, v: object) -> object:
        # The setting was a boolean before in_run: what pydantic reads as true or false keeps its meaning.
        if v in ("off", "in_run", "on", "alone"):
            return v
        try:
            return "on" if BOOLEAN.validate_python(v) else "off"
        except ValidationError:
            return v  # refused by the Literal, with its message

    @field_validator("model_path")
    @classmethod
    def _model_path_is_a_file_path(cls, v: Path) -> Path:
        if str(v).strip() == "":
            raise ValueError("model_path must not be empty")
        return v

    @model_validator(mode="after")
    def _limits_fit_together(self) -> Settings:
        if self.max_queue < self.max_batch_images:
            raise ValueError(
                f"max_queue ({self.max_queue}) must be at least max_batch_images ({self.max_batch_images}), "
                "or a full-size request could never be admitted"
            )
        return self

    @property
    def effective_intra_op_threads(self) -> int:
        return self.intra_op_threads or max(1, usable_cores() // self.effective_workers)

    @property
    def effective_workers(self) -> int:
        return self.workers or usable_cores()

    @property
    def effective_decode_threads(self) -> int:
        return self.decode_threads or max(1, usable_cores() // self.effective_workers)
