"""A model that costs (almost) nothing and obeys the contract: the serving path's own ceiling (issue 14, item 1).

Global average pooling, then a fixed C x classes linear layer, then softmax: a few microseconds per batch, so
what a server does with it per second is what its HTTP, decoding, batching and JSON allow. It takes the input
size, colour mode, preprocessing and labels of a template model (the committed default), so the same
payloads and the same code path serve it. Built with ``onnx.helper``; no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract import (
    COLOUR_MODES,
    INPUT_NAME,
    LOGITS,
    PREPROCESSING_V2_KEYS,
    PREPROCESSING_V3_KEYS,
    PROBABILITIES,
    REQUIRED_KEYS,
    decode_metadata,
    encode_metadata,
)

OPSET = 18  # the default model's; IR 10 is what onnxruntime 1.31 reads
IR_VERSION = 10


def zero_cost_graph(meta: dict) -> onnx.ModelProto:
    """The pool-and-linear model for a template's decoded metadata, with its preprocessing and labels."""
    channels, (h, w), classes = COLOUR_MODES[meta["colour_mode"]], meta["input_size"], len(meta["labels"])
    # Weights that depend on the input, so different images get different (if meaningless) probabilities.
    weight = np.linspace(-1.0, 1.0, channels * classes, dtype=np.float32).reshape(channels, classes)
    nodes = [
        helper.make_node("GlobalAveragePool", [INPUT_NAME], ["pooled"]),  # pooled: (N, C, 1, 1)
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),  # features: (N, C)
        helper.make_node("Gemm", ["features", "weight", "bias"], [LOGITS]),  # logits: (N, classes)
        helper.make_node("Softmax", [LOGITS], [PROBABILITIES], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "zero_cost",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", channels, h, w])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", classes]) for out in (LOGITS, PROBABILITIES)],
        initializer=[numpy_helper.from_array(weight, "weight"),
                     numpy_helper.from_array(np.zeros(classes, np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    kept = ("contract_version", *REQUIRED_KEYS, *PREPROCESSING_V2_KEYS, *PREPROCESSING_V3_KEYS)
    described = {**{k: meta[k] for k in kept if k in meta}, "name": "zero-cost",
                 "arch": "global average pool + fixed linear (bench/zero_cost.py)",
                 "data": "none (fixed weights: measures the serving path, not the model)", "val_accuracy": None}
    helper.set_model_props(model, encode_metadata(described))
    onnx.checker.check_model(model)
    return model


def zero_cost_model(template: Path, path: Path) -> Path:
    """Write the zero-cost model for ``template``'s contract to ``path`` (rewritten each time: it is tiny)."""
    meta = decode_metadata({p.key: p.value for p in onnx.load(template, load_external_data=False).metadata_props})
    onnx.save(zero_cost_graph(meta), path)
    return path
