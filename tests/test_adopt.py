"""Adopting a foreign ONNX classifier (``python -m model.adopt``): files exported with other tensor names, a fixed
batch or a final softmax are served unchanged by the real service, with the original model's probabilities; what
cannot be adopted is refused in one line with exit code 2."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from onnx import TensorProto, helper
from PIL import Image
from torch import nn

from bench.harness import wait_ready
from contract import (
    DESCRIPTIVE_KEYS,
    INPUT_NAME,
    OUTPUT_NAMES,
    PREPROCESSING_V2_KEYS,
    PREPROCESSING_V3_KEYS,
    REQUIRED_KEYS,
    Preprocessing,
)
from model.adopt import adopt, main
from model.resnet import BasicBlock, ResNet
from service.app import create_app
from service.settings import Settings
from tests.conftest import ROOT

LABELS = ["cat", "dog", "fox", "owl", "yak"]
SIZE = 32
IR_VERSION = 8  # hand-made files: onnx's newest IR can be newer than onnxruntime reads
SAMPLES = [ROOT / "samples" / "digit-7.png", ROOT / "samples" / "digit-3.jpg"]
# What adopt assumes for an RGB model when not told, written out here so the test does not lean on its constants.
IMAGENET = Preprocessing((SIZE, SIZE), "RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")


def run_adopt(*args: str | Path) -> subprocess.CompletedProcess:
    """``python -m model.adopt`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "model.adopt", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


class HardcodedBatch(nn.Module):
    """``x.view(x.size(0), -1)``: exported at a static batch of 1, the size is folded into a constant Reshape."""

    def __init__(self, net: ResNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.avgpool(self.net.layer2(self.net.layer1(self.net.maxpool(self.net.conv1(x)))))
        return self.net.fc(x.view(x.size(0), -1))


def export_foreign(net: nn.Module, path: Path, output_name: str, **kwargs) -> Path:
    """A file as another project exports it: TorchScript exporter, its own tensor names ("data", ...)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        torch.onnx.export(net, (torch.zeros(1, 3, SIZE, SIZE),), path, input_names=["data"],
                          output_names=[output_name], dynamo=False, **kwargs)
    return path


@pytest.fixture(scope="module")
def net() -> ResNet:
    """A small torchvision-layout ResNet (7x7 stem, max pooling, layerN, fc); a scaled head, so its
    probabilities are far from uniform and a softmax applied twice would show."""
    torch.manual_seed(0)
    net = ResNet(BasicBlock, [1, 1], [8, 16], num_classes=len(LABELS), stem="imagenet").eval()
    with torch.no_grad():
        net.fc.weight.mul_(20)
    return net


@pytest.fixture(scope="module")
def foreign(net, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("foreign")
    return {
        "dynamic": export_foreign(net, tmp / "dynamic.onnx", "fc_out",
                                  dynamic_axes={"data": {0: "N"}, "fc_out": {0: "N"}}),
        # batch 1, and the weights listed as graph inputs too, as in the ONNX model zoo's older files
        "fixed": export_foreign(net, tmp / "fixed.onnx", "fc_out", keep_initializers_as_inputs=True),
        "softmax": export_foreign(nn.Sequential(net, nn.Softmax(dim=1)).eval(), tmp / "softmax.onnx", "prob"),
        "hardcoded": export_foreign(HardcodedBatch(net).eval(), tmp / "hardcoded.onnx", "fc_out"),
    }


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


def torch_probabilities(net: nn.Module, paths: list[Path], softmax: bool = True,
                        pre: Preprocessing = IMAGENET) -> np.ndarray:
    """The original network on these images, preprocessed as the service does for an ImageNet-normalised RGB model."""
    mean = np.asarray(IMAGENET.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(IMAGENET.std, np.float32).reshape(-1, 1, 1)
    x = []
    for p in paths:
        with Image.open(p) as img:
            x.append((pre.to_array(img).astype(np.float32) / 255 - mean) / std)
    with torch.no_grad():
        out = net(torch.from_numpy(np.stack(x)))
    return (torch.softmax(out, 1) if softmax else out).numpy()


def predict(model: Path, paths: list[Path]) -> list[dict]:
    """POST /predict on the real service serving ``model``: one image raw, several as one multipart batch."""
    with TestClient(create_app(Settings(model_path=model, max_batch_size=4))) as client:
        wait_ready(client)
        if len(paths) == 1:
            r = client.post("/predict", content=paths[0].read_bytes(), headers={"content-type": "image/png"})
        else:
            r = client.post("/predict", files=[("files", (p.name, p.read_bytes(), "image/*")) for p in paths])
        assert r.status_code == 200, r.text
        return r.json()["predictions"]


def test_adopt_command_makes_torchvision_layout_file_the_service_serves(net, foreign, labels, tmp_path):
    out = tmp_path / "mine.onnx"
    r = run_adopt(foreign["dynamic"], "--labels", labels, "--out", out)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    assert r.stdout.startswith(f"adopted {foreign['dynamic']} -> {out}"), r.stdout
    (got,) = predict(out, SAMPLES[:1])
    np.testing.assert_allclose(got["probabilities"], torch_probabilities(net, SAMPLES[:1])[0], atol=1e-5)
    assert [t["label"] for t in got["top_k"]][0] == LABELS[int(np.argmax(got["probabilities"]))], got


def test_adopt_shorter_side_crop_serves_photos_as_the_original_saw_them(net, foreign, labels, tmp_path):
    photo = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 72, 3), dtype=np.uint8), "RGB").save(photo)
    out = tmp_path / "cropped.onnx"
    r = run_adopt(foreign["dynamic"], "--labels", labels, "--out", out, "--resize-mode", "shorter-side-crop",
                  "--crop-fraction", "0.875")
    assert r.returncode == 0, r.stderr
    meta = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    assert (meta["resize_mode"], meta["crop_fraction"]) == ("shorter-side-crop", 0.875), meta
    cropped = dataclasses.replace(IMAGENET, resize_mode="shorter-side-crop", crop_fraction=0.875)
    (got,) = predict(out, [photo])
    np.testing.assert_allclose(got["probabilities"], torch_probabilities(net, [photo], pre=cropped)[0], atol=1e-5)
    stretched = torch_probabilities(net, [photo])[0]
    assert np.abs(np.asarray(got["probabilities"]) - stretched).max() > 1e-4, "the crop made no difference"


def test_adopt_writes_contract_names_dynamic_batch_and_metadata(foreign, labels, tmp_path):
    out = tmp_path / "mine.onnx"
    report = adopt(foreign["fixed"], labels, out, name="mine")
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == INPUT_NAME and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, SIZE, SIZE], inp
    assert tuple(o.name for o in session.get_outputs()) == OUTPUT_NAMES
    meta = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    assert set(REQUIRED_KEYS) <= set(meta), meta
    written = set(REQUIRED_KEYS) | set(PREPROCESSING_V2_KEYS) | set(PREPROCESSING_V3_KEYS) | set(DESCRIPTIVE_KEYS)
    assert set(meta) <= written, meta  # none unlisted
    assert meta["labels"] == LABELS and meta["name"] == "mine" and meta["arch"].startswith("adopted: fixed.onnx")
    assert meta["input_size"] == [SIZE, SIZE] and meta["colour_mode"] == "RGB"
    assert meta["mean"] == list(IMAGENET.mean) and meta["std"] == list(IMAGENET.std)
    assert meta["adopted_from"]["input"] == "data" and meta["adopted_from"]["batch"] == 1, meta
    assert report["parity_max_abs_diff"] <= 1e-5 and report["output_kind"] == "logits", report


def test_adopt_softmax_output_serves_the_same_probabilities(net, foreign, labels, tmp_path):
    out = tmp_path / "mine.onnx"
    report = adopt(foreign["softmax"], labels, out)  # --output auto: the rows sum to 1
    assert report["output_kind"] == "probabilities", report
    want = torch_probabilities(net, SAMPLES)
    served = [p["probabilities"] for p in predict(out, SAMPLES)]
    np.testing.assert_allclose(served, want, atol=1e-6)
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    x = np.zeros((2, 3, SIZE, SIZE), np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(["probabilities"], {INPUT_NAME: x})[0], net(torch.from_numpy(x))
                                   .softmax(1).numpy(), atol=1e-6)


def test_adopt_softmax_output_called_logits_warns(foreign, labels, tmp_path):
    report = adopt(foreign["softmax"], labels, tmp_path / "mine.onnx", output="logits")
    (warning,) = report["warnings"]
    assert "'prob' look like probabilities" in warning, warning


def test_adopt_fixed_batch_file_serves_a_batch_of_three(net, foreign, labels, tmp_path):
    out = tmp_path / "mine.onnx"
    adopt(foreign["fixed"], labels, out)
    paths = [SAMPLES[0], SAMPLES[1], SAMPLES[0]]
    served = [p["probabilities"] for p in predict(out, paths)]
    np.testing.assert_allclose(served, torch_probabilities(net, paths), atol=1e-5)


def test_adopt_hardcoded_batch_refused_in_one_line(foreign, labels, tmp_path):
    out = tmp_path / "mine.onnx"
    r = run_adopt(foreign["hardcoded"], "--labels", labels, "--out", out)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "batch size 1 is built into the graph" in r.stderr and "dynamic_axes" in r.stderr, r.stderr
    assert not out.exists()


def test_adopt_reads_json_labels_and_renames_tensors_named_like_the_contract(tmp_path):
    # input called "probabilities", logits called "input": each foreign name must step aside, not collide
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["probabilities"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["input"], axis=1)],
        "confusing", [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])])
    source = tmp_path / "confusing.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION), source)
    (tmp_path / "labels.json").write_text(json.dumps(["r", "g", "b"]))
    report = adopt(source, tmp_path / "labels.json", tmp_path / "mine.onnx")
    session = ort.InferenceSession(tmp_path / "mine.onnx", providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    logits, probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    np.testing.assert_allclose(logits, x.mean(axis=(2, 3)), atol=1e-6)
    np.testing.assert_allclose(probs, torch.from_numpy(logits).softmax(1).numpy(), atol=1e-6)
    assert report["classes"] == 3, report


def tiny(path: Path, inputs: list[tuple[str, list]], out_shape: list, nodes: list | None = None) -> Path:
    """A hand-made ONNX file: ``inputs`` (name, shape) pooled and flattened into one output."""
    graph = helper.make_graph(
        nodes or [helper.make_node("GlobalAveragePool", [inputs[0][0]], ["pooled"]),
                  helper.make_node("Flatten", ["pooled"], ["out"], axis=1)],
        "tiny", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION), path)
    return path


@pytest.fixture(scope="module")
def broken(tmp_path_factory, foreign) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("broken")
    (tmp / "text.onnx").write_text("this is not a protobuf\n" * 4)
    (tmp / "four.txt").write_text("a\nb\nc\nd\n")
    added = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("GlobalAveragePool", ["s"], ["p"]),
             helper.make_node("Flatten", ["p"], ["out"], axis=1)]
    relu = [helper.make_node("Relu", ["x"], ["out"])]
    two_outputs = tmp / "two-outputs.onnx"
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["out"], axis=1),
         helper.make_node("Relu", ["out"], ["aux"])],
        "two-outputs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("out", "aux")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION), two_outputs)
    return {
        "net": foreign["dynamic"],
        "two-inputs": tiny(tmp / "two.onnx", [("a", ["N", 3, 8, 8]), ("b", ["N", 3, 8, 8])], ["N", 3], added),
        "flat-input": tiny(tmp / "flat.onnx", [("x", ["N", 10])], ["N", 10], relu),
        "dynamic-size": tiny(tmp / "anysize.onnx", [("x", ["N", 3, "H", "W"])], ["N", 3]),
        "two-outputs": two_outputs,
        "text": tmp / "text.onnx",
        "missing": tmp / "nowhere.onnx",
        "four-labels": tmp / "four.txt",
    }


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        pytest.param("net", ["--labels", "four-labels"], "has 4 labels, the model's output 'fc_out' has 5 classes",
                     id="label-count"),
        pytest.param("two-inputs", [], "the model has 2 inputs (a, b); adopt needs exactly one", id="two-inputs"),
        pytest.param("flat-input", [], "input 'x' (float ['N', 10]) is not a 4-D float32 image batch",
                     id="not-4d-input"),
        pytest.param("two-outputs", [], "the model has 2 outputs (out, aux); pass --output-name", id="two-outputs"),
        pytest.param("two-outputs", ["--output-name", "fc"], "--output-name 'fc' is not an output of the model "
                     "(out, aux)", id="unknown-output-name"),
        pytest.param("missing", [], "nowhere.onnx: no such file", id="missing-file"),
        pytest.param("text", [], "text.onnx is not an ONNX model", id="not-onnx"),
        pytest.param("net", ["--input-size", "64", "64"], "--input-size 64 64 contradicts the model's fixed input "
                     "32 x 32", id="input-size-vs-graph"),
        pytest.param("dynamic-size", [], "has no fixed height and width: pass --input-size H W", id="no-input-size"),
        pytest.param("net", ["--colour-mode", "L"], "--colour-mode L contradicts the model's 3-channel input",
                     id="colour-mode-vs-graph"),
        pytest.param("net", ["--mean", "0.5"], "pass both --mean and --std", id="mean-without-std"),
        pytest.param("net", ["--mean", "0.5", "--std", "0.5"], "mean and std need 3 values for colour_mode RGB",
                     id="mean-channels"),
        pytest.param("net", ["--output", "probabilities"], "--output probabilities, but the output's rows are not "
                     "probabilities", id="logits-called-probabilities"),
        pytest.param("net", ["--labels", "missing"], "error: --labels ", id="missing-labels"),
    ],
)
def test_adopt_refuses_in_one_line_with_exit_2(broken, labels, tmp_path, capsys, model, args, message):
    args = [str(broken.get(a, a)) for a in args]
    if "--labels" not in args:
        args += ["--labels", str(labels)]
    out = tmp_path / "mine.onnx"
    with pytest.raises(SystemExit) as exit_:
        main([str(broken[model]), *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("python -m model.adopt: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not out.exists()


def test_adopt_output_name_picks_the_classifier_and_drops_the_rest(broken, tmp_path):
    (tmp_path / "labels.txt").write_text("r\ng\nb\n")
    adopt(broken["two-outputs"], tmp_path / "labels.txt", tmp_path / "mine.onnx", input_size=[8, 8],
          output_name="out")
    session = ort.InferenceSession(tmp_path / "mine.onnx", providers=["CPUExecutionProvider"])
    assert tuple(o.name for o in session.get_outputs()) == OUTPUT_NAMES
