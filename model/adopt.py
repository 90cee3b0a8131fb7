"""Adopt a foreign ONNX image classifier (torchvision, timm, the ONNX model zoo): the contract's names, a dynamic
batch axis and metadata written onto it, checked by running it, so the service serves it unchanged.

    python -m model.adopt resnet50.onnx --labels labels.txt --out models/mine.onnx

The foreign graph keeps its weights and nodes; its image input becomes ``input`` and its classifier output
``logits``, with ``probabilities`` (their softmax) beside it; a model that already ends in a softmax gets
``logits = log(p + 1e-30)``, whose softmax (what the service computes) is ``p`` again. Needs onnx and
onnxruntime, never torch: a user who brings an ONNX file need not install it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from PIL import Image

import contract
from contract import CONTRACT_VERSION, INPUT_NAME, LOGITS, PROBABILITIES, ContractError, Preprocessing

# ImageNet's statistics: what torchvision's and most of timm's and the model zoo's classifiers were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARITY_TOLERANCE = 1e-5  # max |p_adopted - p_foreign|, the bound model.export holds its own files to
CHECK_BATCH = 3  # the batch the adopted file must answer; the foreign file is run one image at a time
# log(p + EPS) keeps logits finite where p is 0 (the service's warm-up refuses non-finite logits) and changes
# softmax(logits) by at most classes * EPS; Add broadcasts from opset 7, unlike Max or Clip.
EPS = 1e-30
SUM_TOLERANCE = 1e-4  # rows of an output that sum to 1 within this (and are >= 0) are probabilities
MIN_OPSET = 7


class AdoptError(ValueError):
    """The foreign file cannot be adopted; the message says why, in one line."""


@dataclass(frozen=True)
class Foreign:
    """The foreign classifier's signature: its image input and classifier output as the graph declares them."""

    proto: onnx.ModelProto
    input: onnx.ValueInfoProto
    output: onnx.ValueInfoProto

    @property
    def input_dims(self) -> list[int | str | None]:
        return dims(self.input)

    @property
    def batch(self) -> int | None:
        """The batch size the graph declares, or None where it is dynamic."""
        n = self.input_dims[0]
        return n if isinstance(n, int) and n > 0 else None


def dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """A tensor's declared shape: ints where fixed, names where symbolic, None where unknown."""
    return [d.dim_value if d.HasField("dim_value") else d.dim_param or None
            for d in value.type.tensor_type.shape.dim]


def describe(value: onnx.ValueInfoProto) -> str:
    kind = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()
    shape = dims(value) if value.type.tensor_type.HasField("shape") else "no shape"
    return f"{value.name!r} ({kind} {shape})"


# --- reading the foreign file ---------------------------------------------------------------------------------------


def load(path: Path, output_name: str | None) -> Foreign:
    """The foreign model with its single image input and its classifier output, or ``AdoptError``."""
    if not path.is_file():
        raise AdoptError(f"{path}: no such file")
    try:
        proto = onnx.load(path)  # pulls in external weights, so the adopted file is one file
    except OSError as e:
        raise AdoptError(f"{path}: cannot read it or its external weights ({e.strerror or e})") from e
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError, or anything, on a non-ONNX file
        raise AdoptError(f"{path} is not an ONNX model ({type(e).__name__})") from e
    if not proto.graph.node:
        raise AdoptError(f"{path} is not an ONNX model (it has no graph)")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise AdoptError(f"{path} uses opset {opset}; adopt needs {MIN_OPSET} or later "
                         "(onnx.version_converter.convert_version converts it)")
    weights = {t.name for t in proto.graph.initializer}  # before IR 4, weights are listed as inputs too
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise AdoptError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                         "adopt needs exactly one, the image")
    (inp,) = inputs
    tensor = inp.type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT or not tensor.HasField("shape") or len(tensor.shape.dim) != 4:
        raise AdoptError(f"the model's input {describe(inp)} is not a 4-D float32 image batch (N x C x H x W)")
    outputs = list(proto.graph.output)
    if output_name is not None:
        picked = [o for o in outputs if o.name == output_name]
        if not picked:
            raise AdoptError(f"--output-name {output_name!r} is not an output of the model "
                             f"({', '.join(o.name for o in outputs)})")
    elif len(outputs) != 1:
        raise AdoptError(f"the model has {len(outputs)} outputs ({', '.join(o.name for o in outputs)}); "
                         "pass --output-name with the classifier's")
    else:
        picked = outputs
    out = picked[0]
    if out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise AdoptError(f"the model's output {describe(out)} is not float32")
    return Foreign(proto, inp, out)


def read_labels(path: Path) -> list[str]:
    """One label a line (blank lines skipped), or a JSON list."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise AdoptError(f"--labels {path}: no such file") from e
    except UnicodeDecodeError as e:
        raise AdoptError(f"--labels {path} is not UTF-8 text") from e
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as e:
            raise AdoptError(f"--labels {path} starts like a JSON list but is not one: {e}") from e
        if not all(isinstance(v, str | int) for v in labels):
            raise AdoptError(f"--labels {path}: a JSON list of labels must hold strings")
        labels = [str(v) for v in labels]
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise AdoptError(f"--labels {path} holds no labels")
    return labels


def preprocessing(foreign: Foreign, input_size: list[int] | None, colour_mode: str | None,
                  mean: list[float] | None, std: list[float] | None, resize: str, resize_mode: str = "stretch",
                  crop_fraction: float | None = None) -> Preprocessing:
    """What the graph's input fixes, completed by the flags; a flag that contradicts the graph is refused."""
    _, c, h, w = foreign.input_dims
    shape = f"{describe(foreign.input)}"
    if isinstance(h, int) and isinstance(w, int):
        if input_size is not None and tuple(input_size) != (h, w):
            raise AdoptError(f"--input-size {input_size[0]} {input_size[1]} contradicts the model's fixed input "
                             f"{h} x {w}: {shape}")
        input_size = [h, w]
    elif input_size is None:
        raise AdoptError(f"the model's input {shape} has no fixed height and width: pass --input-size H W")
    by_channels = {n: mode for mode, n in contract.COLOUR_MODES.items()}
    if isinstance(c, int):
        if c not in by_channels:
            raise AdoptError(f"the model's input {shape} has {c} channels; the service feeds 1 (L) or 3 (RGB)")
        if colour_mode is not None and contract.COLOUR_MODES[colour_mode] != c:
            raise AdoptError(f"--colour-mode {colour_mode} contradicts the model's {c}-channel input {shape}")
        colour_mode = colour_mode or by_channels[c]
    colour_mode = colour_mode or "RGB"
    if mean is None and std is None and colour_mode == "RGB":
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    elif mean is None or std is None:
        raise AdoptError("pass both --mean and --std" if colour_mode == "RGB" else
                         "a one-channel (L) model has no common mean and std: pass --mean and --std")
    return Preprocessing((input_size[0], input_size[1]), colour_mode, tuple(mean), tuple(std), resize,
                         resize_mode=resize_mode, crop_fraction=crop_fraction)


# --- running ---------------------------------------------------------------------------------------------------------


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    try:
        blob = proto.SerializeToString()
    except ValueError as e:  # protobuf's 2 GB limit
        raise AdoptError(f"the model is too large for one ONNX file ({e})") from e
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are reported as one line by the caller, not as onnxruntime's log
    try:
        return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's exceptions share no base class worth naming
        raise AdoptError(f"onnxruntime cannot load the model: {first_line(e)}") from e


def first_line(e: Exception) -> str:
    """onnxruntime's message, without its status prefix, cut to where a node is named."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if m := re.search(r"running (\w+) node\. Name:'([^']*)'", text):
        return f"in its {m[1]} node {m[2]!r}"
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return re.sub(r"^\S+\.(cc|h):\d+ \S+\(.*?\)( const)? ", "", text)[:200]  # its C++ source line and signature


def check_images() -> list[Image.Image]:
    """Synthetic images unlike one another (noise, a gradient, blocks), at sizes other than the model's."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8), "RGB")
    ramp = np.linspace(0, 255, 80, dtype=np.float32)
    gradient = Image.fromarray(np.stack([np.outer(ramp, ramp) / 255, ramp[None].repeat(80, 0),
                                         255 - ramp[:, None].repeat(80, 1)], -1).astype(np.uint8), "RGB")
    blocks = Image.fromarray(np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((9, 9, 1))).astype(np.uint8), "RGB")
    return [noise, gradient, blocks][:CHECK_BATCH]


def normalise(pre: Preprocessing, images: list[Image.Image]) -> np.ndarray:
    """The service's input for ``images``: the contract's steps, then (x / 255 - mean) / std in float32, as
    service/preprocessing.py computes it. (N, C, H, W)."""
    mean = np.asarray(pre.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(-1, 1, 1)
    return np.stack([(pre.to_array(img).astype(np.float32) / np.float32(255.0) - mean) / std for img in images])


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise in float64, as the service computes probabilities from logits (service/runtime.py)."""
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def run_foreign(foreign: Foreign, x: np.ndarray) -> np.ndarray:
    """The foreign output for each image of ``x``, one image at a time (tiled where the graph fixes a batch):
    (N, ...) as the graph answers it."""
    s = session(foreign.proto)
    rows = []
    for image in x:
        batch = np.repeat(image[None], foreign.batch or 1, axis=0)
        try:
            out = s.run([foreign.output.name], {foreign.input.name: batch})[0]
        except Exception as e:  # noqa: BLE001 - see session()
            raise AdoptError(f"onnxruntime fails on a {list(batch.shape)} input ({first_line(e)})") from e
        if out.ndim != 2 or len(out) != len(batch):
            raise AdoptError(f"the model's output {foreign.output.name!r} answers shape {list(out.shape)} for a "
                             f"{list(batch.shape)} input; adopt needs (N, classes)")
        rows.append(out[:1])
    return np.concatenate(rows)


def looks_like_probabilities(out: np.ndarray) -> bool:
    return bool((out >= 0).all() and np.abs(out.sum(axis=1) - 1).max() <= SUM_TOLERANCE)


def output_kind(out: np.ndarray, asked: str) -> str:
    """``logits`` or ``probabilities``: what the user said, or (``auto``) what the output's rows look like."""
    if asked == PROBABILITIES and not looks_like_probabilities(out):
        sums = out.sum(axis=1)
        raise AdoptError(f"--output probabilities, but the output's rows are not probabilities (one sums to "
                         f"{sums[np.argmax(np.abs(sums - 1))]:.4g}); leave --output out or pass logits")
    if asked == "auto":
        return PROBABILITIES if looks_like_probabilities(out) else LOGITS
    return asked


# --- rewriting -------------------------------------------------------------------------------------------------------


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If, Loop, Scan bodies) under it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from graphs(sub)


def names(graph: onnx.GraphProto) -> set[str]:
    seen: set[str] = set()
    for g in graphs(graph):
        seen.update(v.name for v in [*g.input, *g.output, *g.value_info, *g.initializer])
        for node in g.node:
            seen.update(node.input)
            seen.update(node.output)
    return seen


def rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Tensor ``old`` is ``new`` everywhere it appears, subgraphs included."""
    for g in graphs(graph):
        for node in g.node:
            node.input[:] = [new if n == old else n for n in node.input]
            node.output[:] = [new if n == old else n for n in node.output]
        for v in [*g.input, *g.output, *g.value_info, *g.initializer]:
            if v.name == old:
                v.name = new


def fresh(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first no tensor of the graph bears; now taken."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def adopted(foreign: Foreign, kind: str, classes: int, meta: dict[str, object]) -> onnx.ModelProto:
    """A copy of the foreign model under the contract: input ``input`` with a dynamic batch axis, outputs
    ``logits`` and ``probabilities`` (N x classes), ``meta`` in its metadata."""
    proto = onnx.ModelProto()
    proto.CopyFrom(foreign.proto)
    graph = proto.graph
    inp, out = foreign.input.name, foreign.output.name
    taken = names(graph)
    # A foreign tensor already called input/logits/probabilities that is not the one to bear the name steps aside.
    bearer = {INPUT_NAME: inp, kind: out}
    for name in (INPUT_NAME, LOGITS, PROBABILITIES):
        if name in taken and bearer.get(name) != name:
            other = fresh(f"{name}_foreign", taken)
            rename(graph, name, other)
            inp, out = (other if t == name else t for t in (inp, out))
    rename(graph, inp, INPUT_NAME)
    rename(graph, out, kind)

    (image,) = [i for i in graph.input if i.name == INPUT_NAME]
    batch = image.type.tensor_type.shape.dim[0]
    if foreign.batch is not None or not batch.dim_param:
        batch.dim_param = "batch"  # clears a fixed dim_value
        del graph.value_info[:]  # shapes inferred at the fixed batch; optional, and onnxruntime infers them again
    if kind == LOGITS:
        graph.node.append(helper.make_node("Softmax", [LOGITS], [PROBABILITIES], axis=1, name="adopt_softmax"))
    else:
        eps, floored = fresh("adopt_eps", taken), fresh("adopt_floored", taken)
        graph.node.extend([
            helper.make_node("Constant", [], [eps], value=helper.make_tensor(eps, onnx.TensorProto.FLOAT, [], [EPS]),
                             name="adopt_eps"),
            helper.make_node("Add", [PROBABILITIES, eps], [floored], name="adopt_floor"),
            helper.make_node("Log", [floored], [LOGITS], name="adopt_log"),
        ])
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [batch.dim_param, classes])
                        for name in contract.OUTPUT_NAMES)
    mine = contract.encode_metadata(meta)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in mine]
    del proto.metadata_props[:]
    for key, value in [*kept, *mine.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise AdoptError(f"the rewritten model is not valid ONNX: {str(e).splitlines()[0]}") from e
    return proto


# --- checking the result as the service will read it -----------------------------------------------------------------


def read_spec(s: ort.InferenceSession, name: str) -> contract.ModelSpec:
    """The contract's checks on the adopted file, on what onnxruntime reports, exactly as service/runtime.py does."""
    meta = contract.decode_metadata(s.get_modelmeta().custom_metadata_map)
    inputs = [contract.Tensor(t.name, t.type, t.shape) for t in s.get_inputs()]
    outputs = [contract.Tensor(t.name, t.type, t.shape) for t in s.get_outputs()]
    return contract.read_spec(meta, inputs, outputs, name=name, version="adopt")


def check_batches(s: ort.InferenceSession, foreign: Foreign, x: np.ndarray, want: np.ndarray) -> float:
    """The adopted file at batch 1 and at batch ``len(x)`` against the foreign answers ``want`` (probabilities,
    (N, classes)): the largest difference, in the probabilities the service serves and in the file's own."""
    first = s.run(None, {INPUT_NAME: x[:1]})
    diff = max(float(np.abs(softmax(first[0]) - want[:1]).max()), float(np.abs(first[1] - want[:1]).max()))
    if diff > PARITY_TOLERANCE:
        raise AdoptError(f"the adopted model disagrees with the original by {diff:.2e} > {PARITY_TOLERANCE:.0e}")
    n = len(x)
    try:
        logits, probs = s.run(None, {INPUT_NAME: x})
        problem = (None if logits.shape == want.shape else f"answers batch {n} with shape {list(logits.shape)}")
    except Exception as e:  # noqa: BLE001 - see session()
        problem = f"fails at batch {n} ({first_line(e)})"
    if problem is None:
        batch_diff = max(float(np.abs(softmax(logits) - want).max()), float(np.abs(probs - want).max()))
        problem = None if batch_diff <= PARITY_TOLERANCE else f"answers batch {n} differently ({batch_diff:.1e})"
        diff = max(diff, batch_diff)
    if problem is not None:
        built_in = (f"its batch size {foreign.batch} is built into the graph (e.g. a Reshape to a fixed shape)"
                    if foreign.batch else "its graph does not honour its dynamic batch axis")
        raise AdoptError(f"the model cannot serve batches: {built_in}; it {problem}. Re-export it with a dynamic "
                         f"batch axis: torch.onnx.export(..., dynamic_axes={{{foreign.input.name!r}: {{0: 'batch'}}}}) "
                         "or, with dynamo=True, dynamic_shapes")
    return diff


def adopt(source: Path, labels_path: Path, out: Path, *, input_size: list[int] | None = None,
          colour_mode: str | None = None, mean: list[float] | None = None, std: list[float] | None = None,
          resize: str = "bilinear", resize_mode: str = "stretch", crop_fraction: float | None = None,
          output: str = "auto", output_name: str | None = None, name: str | None = None) -> dict:
    """Write ``out``, the foreign classifier ``source`` under the contract, checked; returns the report."""
    source, out = Path(source), Path(out)
    foreign = load(source, output_name)
    labels = read_labels(Path(labels_path))
    pre = preprocessing(foreign, input_size, colour_mode, mean, std, resize, resize_mode, crop_fraction)

    x = normalise(pre, check_images())  # (N, C, H, W)
    answer = run_foreign(foreign, x)  # (N, classes)
    classes = answer.shape[1]
    if classes != len(labels):
        raise AdoptError(f"--labels {labels_path} has {len(labels)} labels, the model's output "
                         f"{foreign.output.name!r} has {classes} classes")
    if not np.isfinite(answer).all():
        raise AdoptError(f"the model's output {foreign.output.name!r} is not finite on the check images")
    kind = output_kind(answer, output)
    warnings = [f"--output logits, but the rows of {foreign.output.name!r} look like probabilities: the service "
                "will serve their softmax, much flatter than they are"] if output == LOGITS and \
        looks_like_probabilities(answer) else []
    want = softmax(answer) if kind == LOGITS else answer.astype(np.float64)

    producer = " ".join(v for v in (foreign.proto.producer_name, foreign.proto.producer_version) if v)
    meta = {
        "contract_version": CONTRACT_VERSION,
        "name": name or out.stem,
        "labels": labels,
        **pre.to_metadata(),
        "arch": f"adopted: {source.name}" + (f" ({producer})" if producer else ""),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "adopted_from": {"file": source.name, "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                         "producer": producer, "input": foreign.input.name, "output": foreign.output.name,
                         "output_kind": kind, "batch": foreign.batch or "dynamic"},
    }
    proto = adopted(foreign, kind, classes, meta)
    s = session(proto)
    spec = read_spec(s, meta["name"])
    diff = check_batches(s, foreign, x, want)

    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, out, save_as_external_data=False)
    return {"out": str(out), "bytes": out.stat().st_size, "classes": len(spec.labels), "input": foreign.input.name,
            "output": foreign.output.name, "output_kind": kind, "batch": foreign.batch or "dynamic",
            "preprocessing": pre.to_metadata(), "parity_max_abs_diff": diff, "parity_images": len(x),
            "warnings": warnings}


def summary(source: Path, report: dict) -> str:
    pre = report["preprocessing"]
    batch = "dynamic" if report["batch"] == "dynamic" else f"fixed at {report['batch']} in the original, made dynamic"
    source_out = "logits" if report["output_kind"] == LOGITS else "probabilities (logits = their log)"
    return "\n".join([
        f"adopted {source} -> {report['out']} ({report['bytes']:,} bytes)",
        f"  input   {report['input']!r} -> {INPUT_NAME!r}, batch axis {batch}",
        f"  output  {report['output']!r} ({source_out}, {report['classes']} classes) -> {LOGITS!r}, {PROBABILITIES!r}",
        f"  preprocessing  {pre['colour_mode']} {pre['input_size'][0]}x{pre['input_size'][1]} "
        f"{pre.get('resize_mode', 'stretch')} {pre['resize']}, "
        f"mean {pre['mean']}, std {pre['std']}",
        f"  checked  batch 1 and {report['parity_images']}, {report['parity_images']} synthetic images: "
        f"max |dp| {report['parity_max_abs_diff']:.1e} (limit {PARITY_TOLERANCE:.0e})",
    ])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.adopt",
        description="Write the service's contract onto an ONNX image classifier made elsewhere (torchvision, timm, "
                    "the ONNX model zoo): rename its input and output, make its batch axis dynamic, add "
                    "probabilities and the metadata, and check the result by running it. Needs onnx and onnxruntime, "
                    "not torch.",
    )
    p.add_argument("model", type=Path, help="the foreign .onnx file (one image input, N x C x H x W float32)")
    p.add_argument("--labels", type=Path, required=True,
                   help="class labels in output order: a text file with one a line, or a JSON list")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="height and width the model sees (default: read from the graph; needed where it is dynamic)")
    p.add_argument("--colour-mode", choices=sorted(contract.COLOUR_MODES), default=None,
                   help="default: from the graph's channels (3: RGB, 1: L), RGB where they are dynamic")
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="per channel, on the [0, 1] pixel scale (default for RGB: ImageNet's 0.485 0.456 0.406; "
                        "no default for L); a model fed 0..255 pixels takes --mean 0 0 0 "
                        "--std 0.0039215686 0.0039215686 0.0039215686")
    p.add_argument("--std", type=float, nargs="+", default=None,
                   help="per channel, on the [0, 1] scale (default for RGB: ImageNet's 0.229 0.224 0.225)")
    p.add_argument("--resize", choices=sorted(contract.RESIZE_FILTERS), default="bilinear",
                   help="Pillow filter of the resize (default: bilinear)")
    p.add_argument("--resize-mode", choices=contract.RESIZE_MODES, default="stretch",
                   help="how an image reaches the input size (docs/model.md#preprocessing-modes): stretch (default), "
                        "shorter-side-crop (torchvision's ImageNet evaluation with --crop-fraction 0.875) or pad")
    p.add_argument("--crop-fraction", type=float, default=None,
                   help="shorter-side-crop only: the crop's share of the resized image (ImageNet: 0.875)")
    p.add_argument("--output", choices=("auto", LOGITS, PROBABILITIES), default="auto",
                   help="what the foreign output holds (default auto: probabilities if its rows are >= 0 and sum to "
                        "1 on the check images, else logits)")
    p.add_argument("--output-name", default=None, help="the classifier output, where the model has several")
    p.add_argument("--name", default=None, help="model name recorded in the file (default: the --out file's stem)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    try:
        report = adopt(args.model, args.labels, args.out, input_size=args.input_size, colour_mode=args.colour_mode,
                       mean=args.mean, std=args.std, resize=args.resize, resize_mode=args.resize_mode,
                       crop_fraction=args.crop_fraction, output=args.output,
                       output_name=args.output_name, name=args.name)
    except (AdoptError, ContractError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    except OSError as e:
        p.exit(2, f"{p.prog}: error: {e.filename or ''}: {e.strerror or e}\n")
    for warning in report["warnings"]:
        print(f"{p.prog}: warning: {warning}", file=sys.stderr)
    print(summary(args.model, report))


if __name__ == "__main__":
    main()
