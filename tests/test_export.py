"""Export: one self-contained, checked ONNX file with the contract's names, dynamic batch and metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model.data import load_digits_data
from model.export import INPUT_NAME, OUTPUT_NAMES, export
from model.train import TrainConfig, train

REQUIRED_METADATA = {
    "labels", "input_size", "colour_mode", "mean", "std", "resize", "arch", "data", "val_accuracy",
    "created_at", "training_config", "name", "contract_version",
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = TrainConfig(data="digits", arch="resnet8", image_size=8, epochs=1, batch_size=64, progress=False,
                      out=str(tmp / "run"))
    train(cfg)
    report = export(tmp / "run" / "best.pt", tmp / "tiny.onnx")
    return tmp / "tiny.onnx", report


def test_export_writes_one_self_contained_file(exported):
    path, report = exported
    assert sorted(p.name for p in path.parent.iterdir() if p.is_file()) == ["tiny.onnx"]  # no .onnx.data
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert report["parity_max_abs_diff"] <= 1e-5 and report["parity_images"] == 64


def test_export_names_inputs_outputs_and_dynamic_batch(exported):
    path, _ = exported
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == INPUT_NAME and inp.type == "tensor(float)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 8, 8]
    assert tuple(o.name for o in session.get_outputs()) == OUTPUT_NAMES
    for n in (1, 3, 17):
        logits, probs = session.run(None, {INPUT_NAME: np.zeros((n, 1, 8, 8), np.float32)})
        assert logits.shape == probs.shape == (n, 10)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_export_records_metadata_enough_to_serve(exported):
    path, _ = exported
    meta = {p.key: json.loads(p.value) for p in onnx.load(path).metadata_props}
    assert REQUIRED_METADATA <= set(meta)
    assert meta["labels"] == [str(i) for i in range(10)]
    assert meta["input_size"] == [8, 8] and meta["colour_mode"] == "L" and meta["resize"] == "bilinear"
    assert meta["arch"] == "resnet8" and meta["training_config"]["epochs"] == 1
    bundle = load_digits_data(8, 0.2, 0, "bilinear")
    assert meta["mean"] == list(bundle.preprocessing.mean) and meta["std"] == list(bundle.preprocessing.std)


def test_export_probabilities_match_torch_on_real_images(exported, tmp_path):
    path, _ = exported
    from model.export import load_checkpoint

    net, ckpt = load_checkpoint(path.parent / "run" / "best.pt")
    bundle = load_digits_data(8, 0.2, 0, "bilinear")
    x = bundle.preprocessing.normalise(bundle.val.tensors[0][:100])
    with torch.no_grad():
        want = torch.softmax(net(x), 1).numpy()
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["probabilities"], {"input": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-5


def test_export_fp16_keeps_float32_contract_and_serves(exported, tmp_path):
    path = tmp_path / "half.onnx"
    report = export(_checkpoint(exported), path, fp16=True)
    assert report["precision"] == "fp16" and report["parity_max_abs_diff"] <= 5e-3
    proto = onnx.load(path)
    assert json.loads({p.key: p.value for p in proto.metadata_props}["precision"]) == "fp16"
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    assert [o.type for o in session.get_outputs()] == ["tensor(float)", "tensor(float)"]
    from service.runtime import Model
    from service.settings import Settings

    model = Model.load(Settings(model_path=path))
    model.warm_up(4)
    assert model.spec.labels == [str(i) for i in range(10)]


def _checkpoint(exported):
    path, _ = exported
    return path.parent / "run" / "best.pt"
