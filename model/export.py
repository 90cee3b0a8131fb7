"""Export a training checkpoint to one self-describing ONNX file: the only contract with the service.

    python -m model.export runs/digits/best.pt --out models/default.onnx
    python -m model.export runs/digits/best.pt --out models/default.onnx --data path/to/some/images
    python -m model.export runs/digits/best.pt --out models/default-int8.onnx --int8
    python -m model.export runs/digits/best.pt --out models/default-uint8.onnx --uint8-input

Export needs only the checkpoint: it checks onnxruntime against torch on the validation images the checkpoint
carries, or on images from ``--data``. The file has input ``input`` (float32, N x C x H x W, N dynamic; with
``--uint8-input`` uint8 pixels that the graph scales and normalises itself), outputs
``logits`` and ``probabilities`` (N x classes), and ``metadata_props`` (every value JSON-encoded) that tell the
service everything else: labels, preprocessing, arch and measured metrics.

``--int8`` quantizes the float32 file for CPUs (onnxruntime static quantization, QDQ), calibrated on training
images, and writes it only if its top-1 on the validation split is within ``--int8-max-drop`` points of the
float32 file's; both accuracies go into its metadata. It needs labelled images: the checkpoint's training data
when it can still be read, else ``--data`` with a sub-folder per label.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from contract import CONTRACT_VERSION, INPUT_NAME, LOGITS, OUTPUT_NAMES, PROBABILITIES, ContractError, encode_metadata
from model.checkpoint import PARITY_IMAGES, CheckpointError, config_of, load_checkpoint, parity_pixels
from model.data import IMAGE_SUFFIXES, DataBundle, DataError, file_pixels, load_bundle, scan_classes, unreadable
from model.preprocessing import Preprocessing

PARITY_TOLERANCE = 1e-5  # max |p_onnx - p_torch| over a batch of real validation images
FP16_TOLERANCE = 5e-3  # half precision keeps ~3 significant digits
INT8_MAX_DROP = 0.005  # top-1 accuracy int8 may lose against float32 (issue 15 item 5)
CALIBRATION_IMAGES = 512  # training images int8's activation ranges are calibrated on


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


class FromPixels(nn.Module):
    """uint8 pixels in, normalised inside the graph with ``model.preprocessing.normaliser``'s arithmetic, so a
    server hands the decoder's pixels over as they are: 4x less to copy to a GPU (issue 14 item 4)."""

    def __init__(self, net: nn.Module, pre: Preprocessing) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.to(torch.float32) / 255.0 - self.mean) / self.std  # pixels: (N, C, H, W) uint8
        return self.net(x)


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


def validation_pixels(ckpt: dict, data: Path | None = None) -> torch.Tensor:
    """Images as the network's pixels before normalisation, (n, C, H, W) uint8: from ``data`` when given, else the
    validation images the checkpoint carries, else (checkpoints written before they carried any) from its training
    data."""
    pre = Preprocessing.from_metadata(ckpt["preprocessing"])
    if data is not None:
        return folder_pixels(data, pre)
    if "parity_images" in ckpt:
        return ckpt["parity_images"]
    return parity_pixels(training_data(ckpt, "the checkpoint carries no validation images and its",
                                       "a few images of the kind the model classifies"))


def validation_batch(ckpt: dict, data: Path | None = None) -> torch.Tensor:
    """``validation_pixels`` preprocessed as at serving time: (n, C, H, W) float32."""
    return Preprocessing.from_metadata(ckpt["preprocessing"]).normalise(validation_pixels(ckpt, data))


def training_data(ckpt: dict, need: str, instead: str) -> DataBundle:
    """The data the checkpoint was trained on, split as in training; where it cannot be read, an ``ExportError``
    that begins with ``need`` and says what ``--data`` should hold instead."""
    pre = Preprocessing.from_metadata(ckpt["preprocessing"])
    try:
        return load_bundle(dataclasses.replace(config_of(ckpt), colour_mode=pre.colour_mode))
    except DataError as e:
        raise ExportError(f"{need} training data cannot be read ({str(e).splitlines()[0]}); pass --data FOLDER "
                          f"with {instead}") from e


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


def write_onnx(net: nn.Module, meta: dict, batch: torch.Tensor, out: Path, opset: int = 18,
               announce: bool = True) -> dict:
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
    if announce:
        print(json.dumps(report))
    return report


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and activations in float16 for GPUs' tensor cores; the input and outputs stay float32,
    so the contract (and the service) are unchanged."""
    from onnxconverter_common import float16

    # Softmax stays in float32: its exp overflows float16 for logits above ~11. Cast too: the converter retypes
    # the output of --uint8-input's Cast to float16 but leaves its ``to`` at float32, and the checker refuses it.
    half = float16.convert_float_to_float16(
        proto, keep_io_types=True, op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, "Softmax", "Cast"]
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


@dataclasses.dataclass
class Labelled:
    """Images for quantization: some to calibrate on and labelled ones to measure top-1 on, all uint8 (n, C, H, W)."""

    calibration: torch.Tensor
    images: torch.Tensor
    targets: torch.Tensor  # (n,) class indices
    source: str  # where they came from, for the metadata


def labelled_folder(folder: Path, labels: list[str], pre: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``folder``'s class sub-folders (named by the model's labels) as uint8 pixels, with targets."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"--data {folder} is not a folder")
    try:
        classes = scan_classes(folder)
    except DataError as e:
        raise ExportError(f"--data {folder}: {e}") from e
    if not classes:
        raise ExportError(f"--int8 --data {folder} needs a sub-folder of images per label, e.g. {folder}/{labels[0]}/")
    if unknown := sorted(set(classes) - set(labels)):
        raise ExportError(f"--data {folder} has sub-folders that are not labels of the model: {unknown}")
    files = [(f, labels.index(c)) for c, fs in classes.items() for f in fs]
    if bad := unreadable([f for f, _ in files], pre):
        raise ExportError(f"--data {folder}: {len(bad)} images cannot be read, the first {bad[0][0]}: {bad[0][1]}")
    return torch.stack([file_pixels(f, pre) for f, _ in files]), torch.tensor([t for _, t in files])


def labelled_data(ckpt: dict, data: Path | None, n_calibration: int = CALIBRATION_IMAGES) -> Labelled:
    """``data`` (a sub-folder per label: calibrated and measured on the same images) when given, else the
    checkpoint's training data: calibrated on training images, measured on the whole validation split."""
    pre = Preprocessing.from_metadata(ckpt["preprocessing"])
    if data is not None:
        images, targets = labelled_folder(data, ckpt["labels"], pre)
        return Labelled(images, images, targets, f"{Path(data).name} (--data)")
    bundle = training_data(ckpt, "--int8 needs labelled images and the checkpoint's",
                           "a sub-folder of images per label")
    step = max(1, len(bundle.train) // n_calibration)
    calibration = torch.stack([bundle.train[i][0] for i in range(0, len(bundle.train), step)][:n_calibration])
    images, targets = zip(*(bundle.val[i] for i in range(len(bundle.val))), strict=True)
    return Labelled(calibration, torch.stack(images), torch.as_tensor(targets), f"{bundle.name} validation split")


class Calibration:
    """onnxruntime's ``CalibrationDataReader``: the calibration images in batches, as the file takes them."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def top1(path: Path, x: np.ndarray, targets: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy of the ONNX file at ``path`` with onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(Path(path).as_posix(), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run([LOGITS], {INPUT_NAME: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return float((logits.argmax(1) == targets).mean())


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """Static int8 quantization in QDQ format, calibrated on ``calibration`` (the file's input, (n, C, H, W)).

    Per-channel weights, as onnxruntime's guide recommends for convolutions
    (https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html). The last layer's output and
    the softmax stay float32: 256 levels over the logits' range would coarsen the probabilities clients read."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(out.stem + ".prepared.onnx")
    quant_pre_process(fp32.as_posix(), prepared.as_posix())  # folds constants and infers shapes, as the guide asks
    batches = [calibration[i:i + 64] for i in range(0, len(calibration), 64)]
    softmax = [n.name for n in onnx.load(prepared).graph.node if n.op_type == "Softmax"]
    quantize_static(prepared.as_posix(), out.as_posix(), Calibration(batches), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=softmax,
                    extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]})
    prepared.unlink()


def export_int8(net: nn.Module, meta: dict, batch: torch.Tensor, out: Path, opset: int, labelled: Labelled,
                as_input, max_drop: float) -> dict:
    """The float32 file, quantized; written to ``out`` only if its top-1 on ``labelled`` is within ``max_drop``
    of the float32 file's, else ``ExportError`` and nothing written."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        report = write_onnx(net, meta, batch, fp32, opset, announce=False)
        quantize_int8(fp32, int8, as_input(labelled.calibration).numpy())
        x, targets = as_input(labelled.images).numpy(), labelled.targets.numpy()
        acc32, acc8 = top1(fp32, x, targets), top1(int8, x, targets)
        if acc32 - acc8 > max_drop:
            raise ExportError(f"int8 top-1 {acc8:.4f} is {100 * (acc32 - acc8):.2f} points below float32's "
                              f"{acc32:.4f} on {len(x)} images of {labelled.source} (limit {100 * max_drop:.2f} "
                              "points); nothing written")
        quantization = {"method": "onnxruntime static, QDQ, per-channel int8 weights, uint8 activations, MinMax",
                        "calibration_images": len(labelled.calibration), "evaluated_on": labelled.source,
                        "evaluation_images": len(x), "val_accuracy_fp32": acc32, "val_accuracy_int8": acc8}
        proto = onnx.load(int8)
        del proto.metadata_props[:]
        for key, value in encode_metadata({**meta, "precision": "int8", "val_accuracy": acc8,
                                           "quantization": quantization}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto, full_check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(proto, out)
    report = {**report, "out": str(out), "bytes": out.stat().st_size, "precision": "int8", **quantization}
    print(json.dumps(report))
    return report


def export(checkpoint: Path, out: Path, name: str | None = None, opset: int = 18, fp16: bool = False,
           data: Path | None = None, int8: bool = False, max_drop: float = INT8_MAX_DROP,
           uint8_input: bool = False) -> dict:
    """Export a training checkpoint, checking parity on the validation images it carries (or on ``data``)."""
    import onnxruntime as ort

    if fp16 and int8:
        raise ExportError("--fp16 and --int8 exclude each other: choose one precision")
    if max_drop < 0:
        raise ExportError(f"--int8-max-drop must be at least 0 points, got {100 * max_drop:g}")
    net, ckpt = load_checkpoint(Path(checkpoint))
    pre = Preprocessing.from_metadata(ckpt["preprocessing"])
    meta = {**metadata(ckpt, name or Path(out).stem), "input_dtype": "uint8" if uint8_input else "float32"}
    if uint8_input:
        net = FromPixels(net, pre).eval()
    as_input = (lambda pixels: pixels) if uint8_input else pre.normalise  # what the file's input takes
    batch = as_input(validation_pixels(ckpt, data))
    if int8:
        return export_int8(net, {**meta, "precision": "int8"}, batch, Path(out), opset, labelled_data(ckpt, data),
                           as_input, max_drop)
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
    parser.add_argument("--uint8-input", action="store_true",
                        help="input uint8 pixels (N x C x H x W, 0..255), scaled and normalised inside the graph: "
                        "the service then hands the decoder's pixels over as they are")
    parser.add_argument("--int8", action="store_true",
                        help="static int8 quantization (QDQ, for CPUs), calibrated on training images and refused if "
                        "its top-1 on the validation split drops more than --int8-max-drop below float32's; images "
                        "from the checkpoint's training data, or from --data")
    parser.add_argument("--int8-max-drop", type=float, default=100 * INT8_MAX_DROP, metavar="POINTS",
                        help="top-1 accuracy points int8 may lose against float32 (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=None,
                        help="check parity on images from this folder instead of those the checkpoint carries; with "
                        "--int8, a folder with one sub-folder of images per label, calibrated and measured on")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        export(args.checkpoint, args.out, args.name, args.opset, args.fp16, args.data, args.int8,
               args.int8_max_drop / 100, args.uint8_input)
    except (CheckpointError, ExportError, DataError, ContractError, OSError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
