"""The ONNX contract between ``model/`` (which writes it) and ``service/`` (which reads it), defined once.

An exported classifier is one ONNX file with input ``input`` (float32 normalised, or uint8 pixels that the graph
normalises itself; N x C x H x W, N dynamic), outputs
``logits`` and ``probabilities`` (N x classes), and ``metadata_props`` whose values are JSON: labels,
preprocessing, architecture and measured metrics. This module owns the names, the metadata keys and their
validation, the preprocessing description (``Preprocessing``) with its 8-bit image steps, and ``ModelSpec``,
what a server reads from a file. It imports neither torch nor onnxruntime, so both sides (and bench, and
tests) share it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

CONTRACT_VERSION = 1
INPUT_NAME = "input"
LOGITS = "logits"
PROBABILITIES = "probabilities"
OUTPUT_NAMES = (LOGITS, PROBABILITIES)

# metadata_props keys a server needs (preprocessing and labels); everything else export writes is descriptive.
REQUIRED_KEYS = ("labels", "input_size", "colour_mode", "mean", "std", "resize")
DESCRIPTIVE_KEYS = ("contract_version", "name", "arch", "shortcut", "residual", "data", "val_accuracy", "metrics",
                    "created_at", "training_config", "precision", "quantization", "input_dtype")
# The input types a model may take -> numpy dtype: float32 already normalised (x / 255 - mean) / std, or uint8
# pixels that the graph normalises itself (issue 14 item 4: 4x less to copy, no float arithmetic in the server).
INPUT_TYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8"}

COLOUR_MODES = {"L": 1, "RGB": 3}  # Pillow mode -> channels
RESIZE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


class ContractError(ValueError):
    """A file (or a preprocessing description) does not obey the contract; the message says how."""


def to_colour_mode(img: Image.Image, mode: str) -> Image.Image:
    """EXIF orientation applied, 16-bit scaled to 8-bit, transparency flattened onto black, converted to ``mode``.

    Black is the background because the default model reads white ink on black (scikit-learn's digits).
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
        arr = np.asarray(img, dtype=np.int64)
        img = Image.fromarray((arr >> 8).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img)
    return img.convert(mode)


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation preprocessing a model was trained with: written into its metadata, reproduced by the
    service from the metadata alone (a test holds the two sides to 1e-6)."""

    input_size: tuple[int, int]  # (H, W) the network sees
    colour_mode: str  # "L" (1 channel) or "RGB" (3 channels)
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    resize: str = "bilinear"  # Pillow filter that stretches the image to input_size

    def __post_init__(self) -> None:
        if self.colour_mode not in COLOUR_MODES:
            raise ContractError(f"colour_mode must be one of {sorted(COLOUR_MODES)}, got {self.colour_mode!r}")
        if self.resize not in RESIZE_FILTERS:
            raise ContractError(f"resize must be one of {sorted(RESIZE_FILTERS)}, got {self.resize!r}")
        if len(self.input_size) != 2 or any(int(v) < 1 for v in self.input_size):
            raise ContractError(f"input_size must be two positive integers (H, W), got {list(self.input_size)}")
        channels = COLOUR_MODES[self.colour_mode]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ContractError(f"mean and std need {channels} values for colour_mode {self.colour_mode}")
        if any(not s > 0 for s in self.std):
            raise ContractError(f"std must be positive, got {list(self.std)}")

    @property
    def channels(self) -> int:
        return COLOUR_MODES[self.colour_mode]

    def resized(self, img: Image.Image) -> Image.Image:
        """The image in the model's colour mode at the model's input size (still 8-bit)."""
        img = to_colour_mode(img, self.colour_mode)
        h, w = self.input_size
        if img.size != (w, h):
            img = img.resize((w, h), RESIZE_FILTERS[self.resize])
        return img

    def to_array(self, img: Image.Image) -> np.ndarray:
        """The image as the network's pixels before normalisation: uint8 (C, H, W)."""
        arr = np.asarray(self.resized(img), dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return arr.transpose(2, 0, 1)

    def to_metadata(self) -> dict:
        return {"input_size": list(self.input_size), "colour_mode": self.colour_mode, "mean": list(self.mean),
                "std": list(self.std), "resize": self.resize}

    @classmethod
    def from_metadata(cls, meta: Mapping) -> Preprocessing:
        missing = [k for k in REQUIRED_KEYS if k != "labels" and k not in meta]
        if missing:
            raise ContractError(f"model metadata lacks required key {missing[0]!r}")
        try:
            h, w = (int(v) for v in meta["input_size"])
            mean = tuple(float(v) for v in meta["mean"])
            std = tuple(float(v) for v in meta["std"])
        except (TypeError, ValueError) as e:
            raise ContractError(f"malformed preprocessing metadata: {e}") from e
        return cls((h, w), meta["colour_mode"], mean, std, meta["resize"])


# --- metadata_props: every value JSON ------------------------------------------------------------------------------


def encode_metadata(meta: Mapping[str, object]) -> dict[str, str]:
    """metadata_props entries: every value JSON-encoded."""
    return {key: json.dumps(value) for key, value in meta.items()}


def decode_metadata(raw: Mapping[str, str]) -> dict:
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # metadata written by other tools may hold plain strings
    return out


# --- what a server reads from a file --------------------------------------------------------------------------------


class Tensor(NamedTuple):
    """A graph input or output as a runtime reports it: dims are ints, or names/None where dynamic."""

    name: str
    type: str  # "tensor(float)", ...
    shape: Sequence[int | str | None]


@dataclass(frozen=True)
class ModelSpec:
    """What the service needs to know about a model, all of it read from the ONNX file."""

    name: str
    version: str  # first 12 hex digits of the file's sha256: changes whenever the weights do
    labels: list[str]
    input_name: str
    output_name: str  # the logits output; probabilities are computed by the service
    preprocessing: Preprocessing
    metadata: dict = field(default_factory=dict)  # everything in metadata_props, decoded
    input_dtype: str = "float32"  # of INPUT_TYPES' values: what the server feeds the input

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocessing.input_size

    @property
    def colour_mode(self) -> str:
        return self.preprocessing.colour_mode

    @property
    def channels(self) -> int:
        return self.preprocessing.channels

    @property
    def input_shape(self) -> list[int]:
        return [-1, self.channels, *self.input_size]


def read_spec(meta: Mapping, inputs: Sequence[Tensor], outputs: Sequence[Tensor], *, name: str,
              version: str) -> ModelSpec:
    """Check a model's decoded metadata and graph signature against the contract; ``ContractError`` says
    what is wrong."""
    if "labels" not in meta:
        raise ContractError("model metadata lacks required key 'labels'")
    pre = Preprocessing.from_metadata(meta)
    try:
        labels = [str(v) for v in meta["labels"]]
    except TypeError as e:
        raise ContractError(f"metadata labels must be a list, is {meta['labels']!r}") from e
    if len(inputs) != 1:
        raise ContractError(f"model must have exactly one input, has {len(inputs)}")
    inp = inputs[0]
    if inp.type not in INPUT_TYPES or len(inp.shape) != 4:
        raise ContractError(f"model input must be a float32 or uint8 N x C x H x W tensor, is {inp.type} "
                            f"{list(inp.shape)}")
    for axis, want in ((1, pre.channels), (2, pre.input_size[0]), (3, pre.input_size[1])):
        have = inp.shape[axis]
        if isinstance(have, int) and have != want:
            raise ContractError(f"model input axis {axis} is {have}, metadata says {want}")
    if not outputs:
        raise ContractError("model has no outputs")
    output = next((o for o in outputs if o.name == LOGITS), outputs[0])
    classes = output.shape[-1] if output.shape else None
    if len(output.shape) != 2 or (isinstance(classes, int) and classes != len(labels)):
        raise ContractError(f"output {output.name!r} has shape {list(output.shape)}, expected [N, {len(labels)}]")
    return ModelSpec(name=name, version=version, labels=labels, input_name=inp.name, output_name=output.name,
                     preprocessing=pre, metadata=dict(meta), input_dtype=INPUT_TYPES[inp.type])
