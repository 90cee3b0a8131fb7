"""Export: one self-contained, checked ONNX file with the contract's names, dynamic batch and metadata, made from the
checkpoint alone; the command's output and its failures as a user sees them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from contract import (
    CONTRACT_VERSION,
    DESCRIPTIVE_KEYS,
    INPUT_NAME,
    OUTPUT_NAMES,
    PREPROCESSING_V2_KEYS,
    PREPROCESSING_V3_KEYS,
    REQUIRED_KEYS,
)
from model.checkpoint import load_checkpoint
from model.config import TrainConfig
from model.data import load_digits_data
from model.export import export
from model.train import train
from tests.conftest import ROOT, make_class_folder

# "quantization" is written by --int8 only (tests/test_int8.py), "adopted_from" by model.adopt (tests/test_adopt.py).
WRITTEN_METADATA = (set(REQUIRED_KEYS) | set(PREPROCESSING_V2_KEYS) | set(PREPROCESSING_V3_KEYS)
                    | set(DESCRIPTIVE_KEYS)) - {"quantization", "adopted_from"}


def run_export(*args: str) -> subprocess.CompletedProcess:
    """``python -m model.export`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "model.export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


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
    assert set(meta) == WRITTEN_METADATA
    assert meta["labels"] == [str(i) for i in range(10)]
    assert meta["input_size"] == [8, 8] and meta["colour_mode"] == "L" and meta["resize"] == "bilinear"
    assert meta["contract_version"] == CONTRACT_VERSION and meta["fit_to_content"] is None
    assert meta["jpeg_luma"] is True  # trained by this code, which decodes a grey model's JPEGs to their luma
    assert meta["arch"] == "resnet8" and meta["training_config"]["epochs"] == 1
    assert meta["training_config"]["colour_mode"] == meta["colour_mode"]  # the config as used, not its default
    bundle = load_digits_data(8, 0.2, 0, "bilinear")
    assert meta["mean"] == list(bundle.preprocessing.mean) and meta["std"] == list(bundle.preprocessing.std)


def test_export_probabilities_match_torch_on_real_images(exported, tmp_path):
    path, _ = exported
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


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A checkpoint trained on a folder that is then deleted, as when exporting on another machine; its images
    shorter-side cropped onto a white background."""
    tmp = tmp_path_factory.mktemp("folder")
    root = make_class_folder(tmp / "imgs", {"bright": 250, "dark": 10}, size=10, per_class=10)
    spare = shutil.copytree(root, tmp / "spare")
    train(TrainConfig(data=str(root), arch="resnet8", image_size=8, epochs=1, batch_size=4, progress=False,
                      out=str(tmp / "run"), resize_mode="shorter-side-crop", crop_fraction=0.8, background="255"))
    shutil.rmtree(root)
    return tmp / "run" / "best.pt", spare


def test_export_without_the_training_data_prints_only_its_report(folder_run, tmp_path):
    checkpoint, _ = folder_run
    r = run_export(str(checkpoint), "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # no torchvision warnings, no FutureWarning
    (line,) = r.stdout.splitlines()
    report = json.loads(line)
    assert report["parity_images"] == 4 and report["parity_max_abs_diff"] <= 1e-5, report  # its 4 validation images


def test_export_data_flag_checks_parity_on_that_folder(folder_run, tmp_path):
    checkpoint, spare = folder_run
    r = run_export(str(checkpoint), "--out", str(tmp_path / "m.onnx"), "--data", str(spare))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["parity_images"] == 20, r.stdout  # every image of the folder, up to 64


def test_export_writes_the_preprocessing_modes_and_the_service_reads_them(folder_run, tmp_path):
    from service.runtime import Model
    from service.settings import Settings

    checkpoint, _ = folder_run
    export(checkpoint, tmp_path / "m.onnx")
    meta = {p.key: json.loads(p.value) for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert {k: meta[k] for k in PREPROCESSING_V2_KEYS} == {
        "resize_mode": "shorter-side-crop", "crop_fraction": 0.8, "background": [255, 255, 255],
        "fit_to_content": None}
    pre = Model.load(Settings(model_path=tmp_path / "m.onnx", device="cpu")).spec.preprocessing
    assert (pre.resize_mode, pre.crop_fraction, pre.background) == ("shorter-side-crop", 0.8, (255, 255, 255))


def old_checkpoint(checkpoint, tmp_path):
    """A checkpoint as written before checkpoints carried validation images, its training data gone."""
    ckpt = torch.load(checkpoint, weights_only=False)
    del ckpt["parity_images"]
    torch.save(ckpt, tmp_path / "old.pt")
    return tmp_path / "old.pt"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["{tmp}/missing.pt"], "checkpoint {tmp}/missing.pt does not exist", id="missing-checkpoint"),
        pytest.param(["{tmp}/notes.pt"], "{tmp}/notes.pt is not a checkpoint written by model.train",
                     id="not-a-checkpoint"),
        pytest.param(["{old}"], "carries no validation images and its training data cannot be read (data folder",
                     id="moved-data"),
        pytest.param(["{ckpt}", "--data", "{tmp}/nowhere"], "--data {tmp}/nowhere is not a folder",
                     id="data-not-a-folder"),
        pytest.param(["{ckpt}", "--data", "{tmp}/empty"], "--data {tmp}/empty holds no images",
                     id="data-without-images"),
    ],
)
def test_export_failure_is_one_line_and_nonzero_exit(folder_run, tmp_path, args, message):
    checkpoint, _ = folder_run
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    (tmp_path / "empty").mkdir()
    old = old_checkpoint(checkpoint, tmp_path)
    r = run_export(*(a.format(tmp=tmp_path, ckpt=checkpoint, old=old) for a in args), "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert message.format(tmp=tmp_path) in r.stderr, r.stderr
    assert not (tmp_path / "m.onnx").exists()
