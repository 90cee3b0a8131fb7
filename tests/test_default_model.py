"""The committed default model: it must really score the accuracies its metadata claims, on the digits validation
split and on the drawn-digits set."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from bench.drawn import DRAWN_KEY, score
from model.checkpoint import config_of
from model.data import load_bundle


def metadata(path) -> dict:
    return {p.key: json.loads(p.value) for p in onnx.load(path).metadata_props}


def test_default_model_scores_recorded_accuracy_on_validation_split(default_model):
    meta = metadata(default_model)
    cfg = meta["training_config"]
    bundle = load_bundle(config_of({"config": cfg}))  # the data as trained: split, synthetic digits, fit to content
    recorded = {k: meta[k] for k in bundle.preprocessing.to_metadata()}
    assert bundle.preprocessing.to_metadata() == recorded, "the file's preprocessing is not the training data's"
    assert cfg["colour_mode"] == meta["colour_mode"] == "L"  # the training config says what was used
    x = bundle.preprocessing.normalise(bundle.val.tensors[0]).numpy()
    y = bundle.val.tensors[1].numpy()
    session = ort.InferenceSession(default_model, providers=["CPUExecutionProvider"])
    probs = session.run(["probabilities"], {"input": x})[0]
    accuracy = float((probs.argmax(1) == y).mean())
    assert meta["val_accuracy"] >= 0.99, meta["val_accuracy"]
    assert abs(accuracy - meta["val_accuracy"]) < 1e-9, (accuracy, meta["val_accuracy"])
    assert np.isfinite(probs).all()


def test_default_model_scores_recorded_accuracy_on_drawn_digits(default_model):
    recorded = metadata(default_model)["metrics"][DRAWN_KEY]
    s = score(default_model)
    assert recorded >= 0.95, recorded
    assert abs(s["top1"] - recorded) < 1e-9, (s["top1"], recorded, s["misread"])
