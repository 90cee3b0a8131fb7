"""INT8 export (issue 15 item 5): static QDQ quantization calibrated on training images, refused when it costs
more than the allowed top-1 accuracy against float32, and served by the service unchanged."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient

import model.export
from bench.harness import wait_ready
from model.config import TrainConfig
from model.export import Labelled, export, main
from model.train import train
from service.app import create_app
from service.settings import Settings
from tests.images import encode, one_per_class

# A 4-epoch resnet8 at 16x16 is far from converged, so its int8 copy is allowed 5 points (at 8x8 it lost 10 on one
# machine); the real recipe's figures are in docs/throughput.md#int8.
TINY_MAX_DROP = 0.05


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    train(TrainConfig(data="digits", arch="resnet8", image_size=16, epochs=4, batch_size=64, progress=False,
                      out=str(tmp / "run")))
    checkpoint = tmp / "run" / "best.pt"
    export(checkpoint, tmp / "fp32.onnx")
    report = export(checkpoint, tmp / "int8.onnx", int8=True, max_drop=TINY_MAX_DROP)
    return checkpoint, tmp / "fp32.onnx", tmp / "int8.onnx", report


def metadata_of(path) -> dict:
    return {p.key: json.loads(p.value) for p in onnx.load(path).metadata_props}


def test_export_int8_quantizes_weights_and_records_both_accuracies(tiny):
    checkpoint, fp32, int8, report = tiny
    proto = onnx.load(int8)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}, "no QDQ nodes"
    assert any(t.data_type == onnx.TensorProto.INT8 for t in proto.graph.initializer), "no int8 weights"
    assert int8.stat().st_size < fp32.stat().st_size / 2, (int8.stat().st_size, fp32.stat().st_size)
    meta = metadata_of(int8)
    q = meta["quantization"]
    assert meta["precision"] == "int8" and meta["val_accuracy"] == q["val_accuracy_int8"], meta
    assert q["evaluated_on"] == "digits validation split" and q["evaluation_images"] == 360, q
    # float32 measured with onnxruntime on the split training measured with torch: the same figure
    trained = torch.load(checkpoint, weights_only=False)["metrics"]["val_accuracy"]
    assert abs(q["val_accuracy_fp32"] - trained) < 1e-9, (q, trained)
    assert q["val_accuracy_fp32"] - q["val_accuracy_int8"] <= TINY_MAX_DROP, q
    assert report["val_accuracy_int8"] == q["val_accuracy_int8"], report


def test_export_int8_keeps_float32_outputs_and_metadata(tiny):
    _, fp32, int8, _ = tiny
    outputs = {o.name: o.type.tensor_type.elem_type for o in onnx.load(int8).graph.output}
    assert outputs == {"logits": onnx.TensorProto.FLOAT, "probabilities": onnx.TensorProto.FLOAT}, outputs
    float_meta, int8_meta = metadata_of(fp32), metadata_of(int8)
    same = set(float_meta) - {"name", "precision", "val_accuracy", "created_at"}  # name: the file stem
    assert {k: int8_meta[k] for k in same} == {k: float_meta[k] for k in same}
    assert set(int8_meta) - set(float_meta) == {"quantization"}


def test_predict_int8_file_answers_like_the_float32_file(tiny):
    _, fp32, int8, _ = tiny
    files = [("files", (f"{y}.png", encode(img, "PNG"), "image/png")) for img, y in one_per_class()]
    answers = {}
    for path in (fp32, int8):
        with TestClient(create_app(Settings(model_path=path))) as client:
            wait_ready(client)
            r = client.post("/predict", files=files)
            assert r.status_code == 200, r.text
            answers[path] = np.array([p["probabilities"] for p in r.json()["predictions"]])
    got, want = answers[int8], answers[fp32]
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert (got.argmax(1) == want.argmax(1)).sum() >= 9, (got.argmax(1), want.argmax(1))
    assert np.abs(got - want).max() < 0.2, np.abs(got - want).max()


def test_export_int8_refuses_a_quantization_that_loses_accuracy(tiny, tmp_path, monkeypatch, capsys):
    checkpoint, *_ = tiny
    real = model.export.labelled_data

    def blank_calibration(ckpt, data):
        """Activation ranges from all-black images: real digits then saturate every layer."""
        images = real(ckpt, data)
        return Labelled(torch.zeros_like(images.calibration), images.images, images.targets, images.source)

    monkeypatch.setattr(model.export, "labelled_data", blank_calibration)
    with pytest.raises(SystemExit) as e:
        main([str(checkpoint), "--out", str(tmp_path / "m.onnx"), "--int8"])
    message = str(e.value)
    assert message.startswith("error: int8 top-1 ") and "below float32's" in message, message
    assert "(limit 0.50 points); nothing written" in message and "\n" not in message, message
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    assert capsys.readouterr().out == "", "a refused export printed a report"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--int8", "--fp16"], "--fp16 and --int8 exclude each other", id="two-precisions"),
        pytest.param(["--int8", "--int8-max-drop", "-1"], "--int8-max-drop must be at least 0", id="negative-drop"),
        pytest.param(["--int8", "--data", "{tmp}/flat"], "needs a sub-folder of images per label",
                     id="unlabelled-data"),
        pytest.param(["--int8", "--data", "{tmp}/other"], "sub-folders that are not labels of the model: ['cat']",
                     id="unknown-label"),
    ],
)
def test_export_int8_bad_arguments_fail_in_one_line(tiny, tmp_path, args, message):
    checkpoint, *_ = tiny
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(encode(one_per_class()[0][0], "PNG"))
    (tmp_path / "other" / "cat").mkdir(parents=True)
    (tmp_path / "other" / "cat" / "a.png").write_bytes(encode(one_per_class()[0][0], "PNG"))
    with pytest.raises(SystemExit) as e:
        main([str(checkpoint), "--out", str(tmp_path / "m.onnx"), *(a.format(tmp=tmp_path) for a in args)])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "m.onnx").exists()
