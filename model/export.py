"""Export a training checkpoint to one self-describing ONNX file: the only contract with the service.

    python -m model.export runs/digits/best.pt --out models/default.onnx
    python -m model.export runs/digits/best.pt --out models/default.onnx --data path/to/some/images

Export needs only the checkpoint: it checks onnxruntime against torch on the validation images the checkpoint
carries, or on images from ``--data``. The file has input ``input`` (float32, N x C x H x W, N dynamic), outputs
``logits`` and ``probabilities`` (N x classes), and ``metadata_props`` (every value JSON-encoded) that tell the
service everything else: labels, preprocessing, arch and measured metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from contract import CONTRACT_VERSION, INPUT_NAME, OUTPUT_NAMES, PROBABILITIES, ContractError, encode_metadata
from model.checkpoint import PARITY_IMAGES, CheckpointError, config_of, load_checkpoint, parity_pixels
from model.data import IMAGE_SUFFIXES, DataError, file_pixels, load_bundle, unreadable
from model.preprocessing import Preprocessing

PARITY_TOLERANCE = 1e-5  # max |p_onnx - p_torch| over a batch of real validation images
FP16_TOLERANCE = 5e-3  # half precision keeps ~3 significant digits


class ExportError(RuntimeError):
    pass


class WithProbabilities(nn.Module):
    """Logits and their softmax, so clients that cannot do the softmax still get probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)  # (N, classes)
        return logits, torch.softmax(logits.float(), dim=1)


def folder_pixels(folder: Path, pre: Preprocessing, n: int = PARITY_IMAGES) -> torch.Tensor:
    """Up to ``n`` images spread over ``folder`` (and so over its class sub-folders) as uint8 (n, C, H, W)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"--data {folder} is not a folder")
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"--data {folder} holds no images ({' '.join(sorted(IMAGE_SUFFIXES))})")
    picked = files[:: max(1, len(files) // n)][:n]
    if bad := unreadable(picked, pre):
        raise ExportError(f"--data {folder}: {len(bad)} images cannot be read, the first {bad[0][0]}: {bad[0][1]}")
    return torch.stack([file_pixels(f, pre) for f in picked])


def validation_batch(ckpt: dict, data: Path | None = None) -> torch.Tensor:
    """Images preprocessed as at serving time, (n, C, H, W) float32: from ``data`` when given, else the validation
    images the checkpoint carries, else (checkpoints written before they carried any) from its training data."""
    pre = Preprocessing.from_metadata(ckpt["preprocessing"])
    if data is not None:
        return pre.normalise(folder_pixels(data, pre))
    if "parity_images" in ckpt:
        return pre.normalise(ckpt["parity_images"])
    cfg = dataclasses.replace(config_of(ckpt), colour_mode=pre.colour_mode)
    try:
        bundle = load_bundle(cfg)
    except DataError as e:
        raise ExportError(f"the checkpoint carries no validation images and its training data cannot be read "
                          f"({str(e).splitlines()[0]}); pass --data FOLDER with a few images of the kind the model "
                          "classifies") from e
    return pre.normalise(parity_pixels(bundle))


def metadata(ckpt: dict, name: str) -> dict[str, object]:
    pre = Preprocessing.from_metadata(ckpt["preprocessing"])  # the contract's checks, before anything is written
    cfg = ckpt["config"]
    return {
        "contract_version": CONTRACT_VERSION,
        "name": name,
        "labels": ckpt["labels"],
        **pre.to_metadata(),
        "arch": cfg["arch"],
        "shortcut": cfg["shortcut"],
        "residual": not cfg["plain"],
        "data": ckpt["data"],
        "val_accuracy": ckpt["metrics"]["val_accuracy"],
        "metrics": ckpt["metrics"],
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "training_config": cfg,
    }


def skips_torchvision(record: logging.LogRecord) -> bool:
    return "torchvision is not installed" not in record.getMessage()


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence what the dynamo exporter says that a user cannot act on (issue 16, point 7): a warning per torchvision
    op it cannot register (the net uses none) and a FutureWarning torch raises at itself."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addFilter(skips_torchvision)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            yield
    finally:
        registration.removeFilter(skips_torchvision)


def write_onnx(net: nn.Module, meta: dict, batch: torch.Tensor, out: Path, opset: int = 18) -> dict:
    """Export ``net`` with its metadata to one checked file, then verify onnxruntime matches torch on
    ``batch`` (N, C, H, W); returns the parity report."""
    import onnxruntime as ort

    wrapper = WithProbabilities(net).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    # external_data=False: the dynamo exporter otherwise writes weights to a separate .onnx.data file,
    # and the contract is a single file.
    with quiet_exporter():
        program = torch.onnx.export(
            wrapper, (batch[:2],), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch_dim},), opset_version=opset, dynamo=True, external_data=False, verbose=False,
        )
    proto = program.model_proto
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    for key, value in encode_metadata(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"ResNet {meta.get('arch')} trained on {meta.get('data')}; see metadata_props"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, out, save_as_external_data=False)

    # parity: onnxruntime on the CPU vs torch, same inputs
    session = ort.InferenceSession(out.as_posix(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = wrapper(batch)[1].numpy()
    got = session.run([PROBABILITIES], {INPUT_NAME: batch.numpy()})[0]
    diff = float(np.abs(got - want).max())
    if diff > PARITY_TOLERANCE:
        out.unlink()
        raise ExportError(f"onnxruntime and torch disagree by {diff:.2e} > {PARITY_TOLERANCE:.0e}; file removed")
    report = {"out": str(out), "bytes": out.stat().st_size, "parity_max_abs_diff": diff, "parity_images": len(batch)}
    print(json.dumps(report))
    return report


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and activations in float16 for GPUs' tensor cores; the input and outputs stay float32,
    so the contract (and the service) are unchanged."""
    from onnxconverter_common import float16

    # Softmax stays in float32: its exp overflows float16 for logits above ~11.
    half = float16.convert_float_to_float16(
        proto, keep_io_types=True, op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, "Softmax"]
    )
    for output in half.graph.output:  # the converter can leave a blocked op's output in float16
        if output.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        inner = output.name + "_fp16"
        for node in half.graph.node:
            node.output[:] = [inner if o == output.name else o for o in node.output]
        half.graph.node.append(onnx.helper.make_node("Cast", [inner], [output.name], to=onnx.TensorProto.FLOAT))
        output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return half


def export(checkpoint: Path, out: Path, name: str | None = None, opset: int = 18, fp16: bool = False,
           data: Path | None = None) -> dict:
    """Export a training checkpoint, checking parity on the validation images it carries (or on ``data``)."""
    import onnxruntime as ort

    net, ckpt = load_checkpoint(Path(checkpoint))
    batch = validation_batch(ckpt, data)
    meta = metadata(ckpt, name or Path(out).stem)
    report = write_onnx(net, {**meta, "precision": "fp32"}, batch, Path(out), opset)
    if not fp16:
        return report
    half = to_fp16(onnx.load(out))
    for entry in half.metadata_props:
        if entry.key == "precision":
            entry.value = json.dumps("fp16")
    onnx.checker.check_model(half, full_check=True)
    session = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = torch.softmax(net(batch), 1).numpy()
    diff = float(np.abs(session.run([PROBABILITIES], {INPUT_NAME: batch.numpy()})[0] - want).max())
    if diff > FP16_TOLERANCE:
        raise ExportError(f"float16 model disagrees with torch by {diff:.2e} > {FP16_TOLERANCE:.0e}")
    onnx.save_model(half, out)
    report = {**report, "precision": "fp16", "bytes": Path(out).stat().st_size, "parity_max_abs_diff": diff}
    print(json.dumps(report))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.export",
                                     description="Export a checkpoint to a self-describing ONNX file.")
    parser.add_argument("checkpoint", type=Path, help="a best.pt (or last.pt) written by model.train")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--name", default=None, help="model name recorded in the file (default: file stem)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    parser.add_argument("--fp16", action="store_true", help="float16 weights (for GPUs); float32 input/outputs")
    parser.add_argument("--data", type=Path, default=None,
                        help="check parity on images from this folder instead of those the checkpoint carries")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        export(args.checkpoint, args.out, args.name, args.opset, args.fp16, args.data)
    except (CheckpointError, ExportError, DataError, ContractError, OSError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
