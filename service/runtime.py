"""The ONNX model: read its contract (inputs, outputs, metadata), open an onnxruntime session on the
device the settings ask for, and run batches. No torch: the file is the only contract."""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import contract
from contract import ModelSpec
from service.errors import ModelLoadError
from service.settings import Settings, usable_cores

log = logging.getLogger("service")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def read_spec(session: ort.InferenceSession, path: Path, digest: str, name: str) -> ModelSpec:
    """The file's contract, checked (``contract.read_spec``); a violation keeps the model from loading."""
    meta = contract.decode_metadata(session.get_modelmeta().custom_metadata_map)
    inputs = [contract.Tensor(t.name, t.type, t.shape) for t in session.get_inputs()]
    outputs = [contract.Tensor(t.name, t.type, t.shape) for t in session.get_outputs()]
    try:
        return contract.read_spec(meta, inputs, outputs, name=name, version=digest[:12])
    except contract.ContractError as e:
        raise ModelLoadError(f"{e} ({path})") from e


def providers(settings: Settings) -> list:
    """Execution providers to ask onnxruntime for, in order, with the options we run CUDA with."""
    cuda = (CUDA, {
        "device_id": settings.cuda_device_id,
        # EXHAUSTIVE benchmarks every conv algorithm on each new shape: first requests take seconds.
        "cudnn_conv_algo_search": "HEURISTIC",
        # Grow the arena by what is asked, not by doubling, so memory tracks the largest batch.
        "arena_extend_strategy": "kSameAsRequested",
        # onnxruntime's default is on; off keeps float32 answers equal to the CPU's (Settings.cuda_tf32).
        "use_tf32": "1" if settings.cuda_tf32 else "0",
    })
    if settings.device == "cpu":
        return [CPU]
    if settings.device == "cuda":
        return [cuda, CPU]
    # auto: only ask for CUDA where this onnxruntime build has it; the session then says if it works.
    return [cuda, CPU] if CUDA in ort.get_available_providers() else [CPU]


def session_options(threads: int, spinning: str) -> ort.SessionOptions:
    """``threads`` for one session's parallel sections, spinning ``off``, ``in_run`` or ``on`` (onnxruntime's
    default) while they wait for work."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning between runs is onnxruntime's default
    # (docs/throughput.md#spinning-within-a-run-2026-12-03-afternoon).
    if spinning == "off":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    elif spinning == "in_run":
        # onnxruntime_session_options_config_keys.h: the pool stops spinning as soon as the last concurrent
        # Run() returns, and spins again on the next.
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


# RESNET_ORT_SPINNING=alone keeps no lone session for a model whose batch of one takes less than this: a thread's
# wake-up costs as much, so its pool only costs CPU
# (docs/throughput.md#a-lone-batch-on-the-event-loop-2026-12-04-evening).
LONE_MIN_S = 100e-6


def batch_of_one_s(session: ort.InferenceSession, spec: ModelSpec, runs: int = 7) -> float:
    """The median wall time of a batch of one on ``session``, after two runs to warm it."""
    h, w = spec.input_size
    feed = {spec.input_name: np.zeros((1, spec.channels, h, w), spec.input_dtype)}
    times = []
    for i in range(runs + 2):
        start = time.perf_counter()
        session.run([spec.output_name], feed)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class Model:
    """One loaded model: its spec and its session. ``run`` is thread-safe (onnxruntime sessions are)."""

    def __init__(self, spec: ModelSpec, session: ort.InferenceSession, io_binding: bool = False,
                 lone_session: ort.InferenceSession | None = None) -> None:
        self.spec, self.session = spec, session
        # RESNET_ORT_SPINNING=alone: the same model in a session that spins through its runs, for a batch that is
        # all the work on the machine (service.activity); ``session`` sleeps between parallel sections.
        self.lone_session = lone_session
        self.provider = session.get_providers()[0]
        self.io_binding = io_binding

    @classmethod
    def load(cls, settings: Settings) -> Model:
        path = Path(settings.model_path)
        try:
            blob = path.read_bytes()
        except FileNotFoundError as e:
            raise ModelLoadError(f"model file not found: {path}") from e
        except OSError as e:
            raise ModelLoadError(f"cannot read model file {path}: {e.strerror}") from e
        spinning = settings.ort_spinning
        try:
            options = session_options(settings.effective_intra_op_threads, "off" if spinning == "alone" else spinning)
            session = ort.InferenceSession(blob, sess_options=options, providers=providers(settings))
        except Exception as e:  # onnxruntime raises its own exception types for corrupt or unsupported files
            raise ModelLoadError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:300]}") from e
        # Decide from what the session really uses, never from get_available_providers()/get_device(),
        # which only tell what was compiled in: a CUDA build on a host without a working GPU falls back.
        effective = session.get_providers()[0]
        if settings.device == "cuda" and effective != CUDA:
            raise ModelLoadError(
                f"DEVICE=cuda but the CUDA execution provider is not active (session uses {effective}; "
                f"this onnxruntime offers {ort.get_available_providers()})"
            )
        spec = read_spec(session, path, hashlib.sha256(blob).hexdigest(), settings.model_name)
        io_binding = settings.io_binding == "on" or (settings.io_binding == "auto" and effective == CUDA)
        # Spinning is a choice for onnxruntime's CPU threads: on CUDA they only run the few nodes left to the CPU.
        # A lone batch has the machine to itself: every usable core, whatever the shared session's share (on one
        # core there is no pool to spin, and no second session to keep).
        cores = usable_cores()
        lone = None
        if spinning == "alone" and effective == CPU and cores > 1:
            if (one_s := batch_of_one_s(session, spec)) < LONE_MIN_S:
                log.info("no lone session: a batch of one takes %.0f us, too little to share between threads",
                         one_s * 1e6)
            else:
                lone = ort.InferenceSession(blob, sess_options=session_options(cores, "in_run"), providers=[CPU])
        model = cls(spec, session, io_binding, lone)
        log.info("loaded %s version %s from %s on %s", spec.name, spec.version, path, effective)
        return model

    def run(self, x: np.ndarray, alone: bool = False) -> np.ndarray:
        """x: (N, C, H, W) in the model's input dtype (``spec.input_dtype``) -> logits (N, classes) float32.
        ``alone``: nothing else runs on the machine meanwhile (the lone session, where there is one)."""
        session = self.lone_session if alone and self.lone_session is not None else self.session
        if not self.io_binding:
            return session.run([self.spec.output_name], {self.spec.input_name: x})[0]
        # IO binding: onnxruntime copies the input to the device once and writes the logits straight
        # into host memory, instead of staging both through its own per-run buffers.
        binding = session.io_binding()
        binding.bind_cpu_input(self.spec.input_name, np.ascontiguousarray(x))
        binding.bind_output(self.spec.output_name, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def warm_up(self, max_batch_size: int) -> None:
        """Run every batch size the batcher can send, on every session, so the first real request meets no cold
        path (allocations, and on CUDA, cuDNN's per-shape algorithm choice)."""
        h, w = self.spec.input_size
        for alone in (False, True) if self.lone_session is not None else (False,):
            for n in range(1, max_batch_size + 1):
                out = self.run(np.zeros((n, self.spec.channels, h, w), self.spec.input_dtype), alone)
                if out.shape != (n, len(self.spec.labels)) or not np.isfinite(out).all():
                    raise ModelLoadError(f"warm-up at batch {n} gave shape {out.shape} or non-finite logits")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row max so exp never overflows."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
