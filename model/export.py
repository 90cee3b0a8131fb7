"""Export a training checkpoint to one self-describing ONNX file: the only contract with the service.

    python -m model.export runs/digits/best.pt --out models/default.onnx

The file has input ``input`` (float32, N x C x H x W, N dynamic), outputs ``logits`` and
``probabilities`` (N x classes), and ``metadata_props`` (every value JSON-encoded) that tell the
service everything else: labels, preprocessing, arch and measured metrics.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from contract import CONTRACT_VERSION, INPUT_NAME, OUTPUT_NAMES, PROBABILITIES, encode_metadata
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


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    from model.train import TrainConfig, build_model

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = TrainConfig(**ckpt["config"])
    net = build_model(cfg, ckpt["num_classes"], ckpt["in_channels"])
    net.load_state_dict(ckpt["model"])
    return net.eval(), ckpt


def validation_batch(ckpt: dict, n: int = 64) -> torch.Tensor:
    """Real validation images, preprocessed as at serving time: (n, C, H, W) float32."""
    from model.train import TrainConfig, load_bundle

    cfg = TrainConfig(**ckpt["config"])
    bundle = load_bundle(cfg)
    pre = Preprocessing(**{**ckpt["preprocessing"], "input_size": tuple(ckpt["preprocessing"]["input_size"])})
    pixels = torch.stack([bundle.val[i][0] for i in range(min(n, len(bundle.val)))])
    return pre.normalise(pixels)


def metadata(ckpt: dict, name: str) -> dict[str, object]:
    pre = ckpt["preprocessing"]
    cfg = ckpt["config"]
    return {
        "contract_version": CONTRACT_VERSION,
        "name": name,
        "labels": ckpt["labels"],
        "input_size": pre["input_size"],
        "colour_mode": pre["colour_mode"],
        "mean": pre["mean"],
        "std": pre["std"],
        "resize": pre["resize"],
        "arch": cfg["arch"],
        "shortcut": cfg["shortcut"],
        "residual": not cfg["plain"],
        "data": ckpt["data"],
        "val_accuracy": ckpt["metrics"]["val_accuracy"],
        "metrics": ckpt["metrics"],
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "training_config": cfg,
    }


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
    program = torch.onnx.export(
        wrapper, (batch[:2],), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
        dynamic_shapes=({0: batch_dim},), opset_version=opset, dynamo=True, external_data=False,
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


def export(checkpoint: Path, out: Path, name: str | None = None, opset: int = 18, fp16: bool = False) -> dict:
    """Export a training checkpoint, checking parity on a batch of its real validation images."""
    import onnxruntime as ort

    net, ckpt = load_checkpoint(Path(checkpoint))
    batch = validation_batch(ckpt)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a checkpoint to a self-describing ONNX file.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default=None, help="model name recorded in the file (default: file stem)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--fp16", action="store_true", help="float16 weights (for GPUs); float32 input/outputs")
    args = parser.parse_args(argv)
    export(args.checkpoint, args.out, args.name, args.opset, args.fp16)


if __name__ == "__main__":
    main()
