"""The committed default model: it must really score the accuracy its metadata claims."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from model.data import load_digits_data


def test_default_model_scores_recorded_accuracy_on_validation_split(default_model):
    meta = {p.key: json.loads(p.value) for p in onnx.load(default_model).metadata_props}
    cfg = meta["training_config"]
    bundle = load_digits_data(meta["input_size"][0], cfg["val_fraction"], cfg["split_seed"], meta["resize"])
    assert meta["mean"] == list(bundle.preprocessing.mean)
    assert cfg["colour_mode"] == meta["colour_mode"] == "L"  # the training config says what was used
    x = bundle.preprocessing.normalise(bundle.val.tensors[0]).numpy()
    y = bundle.val.tensors[1].numpy()
    session = ort.InferenceSession(default_model, providers=["CPUExecutionProvider"])
    probs = session.run(["probabilities"], {"input": x})[0]
    accuracy = float((probs.argmax(1) == y).mean())
    assert meta["val_accuracy"] >= 0.99, meta["val_accuracy"]
    assert abs(accuracy - meta["val_accuracy"]) < 1e-9, (accuracy, meta["val_accuracy"])
    assert np.isfinite(probs).all()
