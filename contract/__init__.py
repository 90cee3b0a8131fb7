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

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

CONTRACT_VERSION = 3  # 2 added resize modes, the background and fit-to-content; 3 the luma decode of JPEGs;
# files of an earlier version read as before
INPUT_NAME = "input"
LOGITS = "logits"
PROBABILITIES = "probabilities"
OUTPUT_NAMES = (LOGITS, PROBABILITIES)

# metadata_props keys a server needs (preprocessing and labels); everything else export writes is descriptive.
REQUIRED_KEYS = ("labels", "input_size", "colour_mode", "mean", "std", "resize")
DESCRIPTIVE_KEYS = ("contract_version", "name", "arch", "shortcut", "residual", "data", "val_accuracy", "metrics",
                    "created_at", "training_config", "precision", "quantization", "input_dtype", "adopted_from")
# Preprocessing keys added by contract version 2: optional, and absent they mean what version 1 did.
PREPROCESSING_V2_KEYS = ("resize_mode", "crop_fraction", "background", "fit_to_content")
# Added by version 3, optional likewise: absent, a single-channel model's JPEGs are decoded in colour, then converted.
PREPROCESSING_V3_KEYS = ("jpeg_luma",)
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
# How the image is brought to the input size: stretched (aspect ratio lost; version 1's only mode), scaled to cover
# the input and centre-cropped (torchvision's and timm's ImageNet evaluation), or scaled to fit and padded.
RESIZE_MODES = ("stretch", "shorter-side-crop", "pad")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
EXIF_ORIENTATION = 0x0112


class ContractError(ValueError):
    """A file (or a preprocessing description) does not obey the contract; the message says how."""


def to_colour_mode(img: Image.Image, mode: str, background: Sequence[int] | None = None) -> Image.Image:
    """EXIF orientation applied, 16-bit scaled to 8-bit, transparency flattened onto ``background`` (one value per
    channel of ``mode``; black by default, as the default model reads white ink on black), converted to ``mode``."""
    img.load()  # a PNG's eXIf chunk may follow its pixels
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # else exif_transpose would only copy the image
        img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
        arr = np.asarray(img, dtype=np.int64)
        img = Image.fromarray((arr >> 8).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        r, g, b = (0, 0, 0) if background is None else tuple(background) * (3 // len(background))
        img = Image.alpha_composite(Image.new("RGBA", img.size, (r, g, b, 255)), img)
    return img if img.mode == mode else img.convert(mode)  # the image itself when nothing changes


@dataclass(frozen=True)
class FitToContent:
    """Crop a drawing to its ink and centre it in a square with a margin, as MNIST and scikit-learn's digits
    were normalised (LeCun et al. 1998: the ink's box, then centred), before the resize."""

    margin: float = 0.1  # added on each side, as a fraction of the ink box's longer side
    threshold: int = 32  # a pixel is ink when a channel differs from the background by more than this (0..254)

    def __post_init__(self) -> None:
        if isinstance(self.margin, bool) or not isinstance(self.margin, int | float) or not 0 <= self.margin <= 1:
            raise ContractError(f"fit_to_content margin must be a number in [0, 1], got {self.margin!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or not 0 <= self.threshold <= 254:
            raise ContractError(f"fit_to_content threshold must be an integer in [0, 254], got {self.threshold!r}")

    def to_metadata(self) -> dict:
        return {"margin": self.margin, "threshold": self.threshold}

    @classmethod
    def from_metadata(cls, value: object) -> FitToContent | None:
        if value is None:
            return None
        if not isinstance(value, Mapping) or set(value) != {"margin", "threshold"}:
            raise ContractError(f"fit_to_content must be null or {{\"margin\": .., \"threshold\": ..}}, got {value!r}")
        return cls(value["margin"], value["threshold"])


FIT_MAX_GROWTH = 4  # fit_to_content's square holds at most this many times the image's pixels (plus 1 Mpx)


# Up to this many pixels a single-band image's ink is found through a float table (mode F): Pillow rounds an integer
# table in Python on every call, most of a small image's cost, and passes a float one to C as it is. Past it F's four
# bytes a pixel ate that gain, and numpy's extremes of each row and column beat both
# (docs/throughput.md#small-images-by-table-2026-12-08, #large-images-by-their-extremes-2026-12-08).
FLOAT_INK_MAX_PIXELS = 2**16


@functools.lru_cache(maxsize=64)
def ink_table(background: tuple[int, ...], threshold: int, as_float: bool = False) -> list[int] | list[float]:
    """``Image.point``'s table for 8-bit bands, band after band: 255 where a value is ink, 0 where background."""
    ink, blank = (255.0, 0.0) if as_float else (255, 0)
    return [ink if abs(v - b) > threshold else blank for b in background for v in range(256)]


def ink_box(img: Image.Image, background: tuple[int, ...], threshold: int) -> tuple[int, int, int, int] | None:
    """The bounding box (left, upper, right, lower) of the pixels differing from ``background`` (a value per band) by
    more than ``threshold`` in some band; None if there are none. In C either way: through a lookup table in Pillow
    (255 where a band is ink) and ``getbbox`` over every band, or, for a large single-band image, from numpy's
    extremes of each row, then of each column of the rows that hold ink (a value is ink above or below a bound)."""
    if len(background) > 1:
        return img.point(ink_table(background, threshold)).getbbox()
    if img.width * img.height <= FLOAT_INK_MAX_PIXELS:
        return img.point(ink_table(background, threshold, as_float=True), "F").getbbox()
    pixels = np.asarray(img)
    above, below = background[0] + threshold, background[0] - threshold

    def inked(part: np.ndarray, axis: int) -> np.ndarray:
        found = part.max(axis) > above if above < 255 else np.zeros(part.shape[1 - axis], bool)
        return found | (part.min(axis) < below) if below > 0 else found

    rows = np.flatnonzero(inked(pixels, 1))
    if not rows.size:
        return None
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(inked(pixels[top:bottom], 0))
    return int(cols[0]), top, int(cols[-1]) + 1, bottom


def fit_to_content(img: Image.Image, background: int | Sequence[int], margin: float, threshold: int) -> Image.Image:
    """The ink's bounding box (pixels differing from ``background`` by more than ``threshold`` in some channel),
    centred on a square of ``background`` with ``margin`` times its longer side on each side. A blank image comes
    back unchanged."""
    FitToContent(margin, threshold)  # the same checks as the metadata's
    channels = len(img.getbands())
    bg = tuple(int(v) for v in background) if isinstance(background, Sequence) else (int(background),)
    bg = bg * channels if len(bg) == 1 else bg  # one value, or one per channel
    fill = bg if channels > 1 else bg[0]
    found = ink_box(img, bg, threshold)
    if found is None:
        return img
    box = img.crop(found)
    side = max(box.size) + 2 * math.floor(margin * max(box.size) + 0.5)
    if side * side > FIT_MAX_GROWTH * img.width * img.height + 2**20:
        # A long thin stroke would make a square far larger than the image (a memory bomb from a few bytes of PNG):
        # reduce the box by an integer factor first, so the square stays within a bound.
        factor = math.ceil(side / math.sqrt(FIT_MAX_GROWTH * img.width * img.height + 2**20))
        box = box.reduce(factor)
        side = max(box.size) + 2 * math.floor(margin * max(box.size) + 0.5)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(box, ((side - box.width) // 2, (side - box.height) // 2))
    return canvas


def resize_size(input_size: tuple[int, int], crop_fraction: float) -> tuple[int, int]:
    """(H, W) the image is scaled to cover before the centre crop to ``input_size``."""
    # timm's transforms_imagenet_eval: scale_size = floor(img_size / crop_pct); 224 / 0.875 = 256, torchvision's.
    return math.floor(input_size[0] / crop_fraction), math.floor(input_size[1] / crop_fraction)


def shorter_side_crop(img: Image.Image, input_size: tuple[int, int], crop_fraction: float,
                      resample: Image.Resampling) -> Image.Image:
    """Scaled, aspect ratio kept, to cover ``resize_size`` (for a square input: the shorter side to it), then the
    centre ``input_size`` cut out: torchvision's Resize(int) + CenterCrop, its arithmetic included."""
    h, w = input_size
    sh, sw = resize_size(input_size, crop_fraction)
    iw, ih = img.size
    # torchvision's Resize: the longer side int(size * long / short), truncated; which side binds decides the other
    nw, nh = (int(sh * iw / ih), sh) if iw * sh >= ih * sw else (sw, int(sw * ih / iw))
    # torchvision's CenterCrop: the offset int(round((size - crop) / 2.0)), Python's half-to-even round
    left, top = int(round((nw - w) / 2.0)), int(round((nh - h) / 2.0))
    if nw * nh <= max(4 * iw * ih, 4 * sw * sh):
        resized = img if (nw, nh) == img.size else img.resize((nw, nh), resample)
        return resized.crop((left, top, left + w, top + h))
    # An extreme aspect ratio would make the intermediate image huge (a memory bomb from a thin PNG): resize only the
    # window the crop keeps, which matches the full resize within one grey level.
    sx, sy = iw / nw, ih / nh
    return img.resize((w, h), resample, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))


def pad(img: Image.Image, input_size: tuple[int, int], background: Sequence[int],
        resample: Image.Resampling) -> Image.Image:
    """Scaled, aspect ratio kept, to fit inside ``input_size``, centred on ``background``: nothing is cut off.
    Scaling before padding keeps memory to the input size whatever the aspect ratio (a square for a 1 x 10^6
    image would not fit in memory) and leaves a sharp edge between image and padding."""
    h, w = input_size
    iw, ih = img.size
    nw, nh = (w, max(1, round(ih * w / iw))) if iw * h >= ih * w else (max(1, round(iw * h / ih)), h)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), resample)
    if (nw, nh) == (w, h):
        return img
    canvas = Image.new(img.mode, (w, h), tuple(background) if len(background) > 1 else background[0])
    canvas.paste(img, ((w - nw) // 2, (h - nh) // 2))
    return canvas


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation preprocessing a model was trained with: written into its metadata, reproduced by the
    service from the metadata alone (a test holds the two sides to 1e-6)."""

    input_size: tuple[int, int]  # (H, W) the network sees
    colour_mode: str  # "L" (1 channel) or "RGB" (3 channels)
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    resize: str = "bilinear"  # Pillow filter of every resize below
    resize_mode: str = "stretch"  # one of RESIZE_MODES
    crop_fraction: float | None = None  # shorter-side-crop only: the crop's share of the resized image, (0, 1]
    background: tuple[int, ...] | None = None  # per channel, 0..255: under transparency and in padding; None: black
    fit_to_content: FitToContent | None = None  # drawings: crop to the ink, centre in a square, then resize
    # A single-channel model's colour JPEGs decoded to their stored luma (Y) alone: no chroma to decode, upsample
    # and convert (docs/throughput.md#luma-decode-2026-12-07). Files before contract version 3 decoded in colour
    # and converted to L (False), which differs only where a saturated colour clips at 0 or 255.
    jpeg_luma: bool = True

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
        if self.resize_mode not in RESIZE_MODES:
            raise ContractError(f"resize_mode must be one of {list(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.resize_mode == "shorter-side-crop":
            fraction = self.crop_fraction
            if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
                raise ContractError(f"resize_mode shorter-side-crop needs crop_fraction in (0, 1], got {fraction!r}")
        elif self.crop_fraction is not None:
            raise ContractError(f"crop_fraction applies only to resize_mode shorter-side-crop, not {self.resize_mode}")
        background = (0,) * channels if self.background is None else self.background
        if (isinstance(background, str | bytes) or not isinstance(background, Sequence) or len(background) != channels
                or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255 for v in background)):
            raise ContractError(f"background needs {channels} integers in [0, 255] for colour_mode "
                                f"{self.colour_mode}, got {self.background!r}")
        object.__setattr__(self, "background", tuple(background))  # None and lists read as the tuple they mean
        if self.fit_to_content is not None and not isinstance(self.fit_to_content, FitToContent):
            raise ContractError(f"fit_to_content must be a FitToContent or None, got {self.fit_to_content!r}")
        if not isinstance(self.jpeg_luma, bool):
            raise ContractError(f"jpeg_luma must be true or false, got {self.jpeg_luma!r}")

    @property
    def channels(self) -> int:
        return COLOUR_MODES[self.colour_mode]

    def resized(self, img: Image.Image) -> Image.Image:
        """The image in the model's colour mode at the model's input size (still 8-bit)."""
        img = to_colour_mode(img, self.colour_mode, self.background)
        if self.fit_to_content is not None:
            img = fit_to_content(img, self.background, self.fit_to_content.margin, self.fit_to_content.threshold)
        h, w = self.input_size
        if self.resize_mode == "shorter-side-crop":
            return shorter_side_crop(img, self.input_size, self.crop_fraction, RESIZE_FILTERS[self.resize])
        if self.resize_mode == "pad":
            return pad(img, self.input_size, self.background, RESIZE_FILTERS[self.resize])
        if img.size != (w, h):
            img = img.resize((w, h), RESIZE_FILTERS[self.resize])
        return img

    def to_array(self, img: Image.Image) -> np.ndarray:
        """The image as the network's pixels before normalisation: uint8 (C, H, W), read-only."""
        img = self.resized(img)  # L or RGB
        # np.asarray(img)'s pixels through a cheaper door: Pillow's array interface cost more than the copy
        # (docs/throughput.md#small-images-by-table-2026-12-08).
        return np.frombuffer(img.tobytes(), np.uint8).reshape(img.height, img.width, -1).transpose(2, 0, 1)

    def draft_size(self) -> tuple[int, int] | None:
        """The least (width, height) a JPEG may be decoded at (DCT scaling) and still give the pixels of a full
        decode's resize; None when only a full decode does (the ink of a drawing may be a few pixels of it)."""
        if self.fit_to_content is not None:
            return None
        # Square, so EXIF rotation is moot: at least the input for stretch and pad, the image crop_size cuts from.
        side = max(self.input_size if self.crop_fraction is None else resize_size(self.input_size, self.crop_fraction))
        return side, side

    def draft(self, img: Image.Image) -> Image.Image:
        """``img`` (opened, not yet loaded) set to decode a JPEG at 1/2, 1/4 or 1/8 scale via the DCT where
        ``draft_size`` allows (a 12 MP photo costs a fraction of a full decode), and to its luma alone for a
        single-channel model with ``jpeg_luma``. Training and the service both decode this way, so they see the
        same pixels."""
        size = self.draft_size()
        mode = "L" if self.jpeg_luma and self.colour_mode == "L" else None  # Pillow changes only a YCbCr file's
        if img.format in ("JPEG", "MPO") and (size is not None or mode is not None):
            img.draft(mode, size)
        return img

    def to_metadata(self) -> dict:
        return {"input_size": list(self.input_size), "colour_mode": self.colour_mode, "mean": list(self.mean),
                "std": list(self.std), "resize": self.resize, "resize_mode": self.resize_mode,
                "crop_fraction": self.crop_fraction, "background": list(self.background),
                "fit_to_content": None if self.fit_to_content is None else self.fit_to_content.to_metadata(),
                "jpeg_luma": self.jpeg_luma}

    @classmethod
    def from_metadata(cls, meta: Mapping) -> Preprocessing:
        version = meta.get("contract_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ContractError(f"contract_version must be a positive integer, got {version!r}")
        if version > CONTRACT_VERSION:
            raise ContractError(f"the file follows contract version {version}; this reader knows up to "
                                f"{CONTRACT_VERSION}: update the service")
        missing = [k for k in REQUIRED_KEYS if k != "labels" and k not in meta]
        if missing:
            raise ContractError(f"model metadata lacks required key {missing[0]!r}")
        try:
            h, w = (int(v) for v in meta["input_size"])
            mean = tuple(float(v) for v in meta["mean"])
            std = tuple(float(v) for v in meta["std"])
            background = None if meta.get("background") is None else tuple(meta["background"])
        except (TypeError, ValueError) as e:
            raise ContractError(f"malformed preprocessing metadata: {e}") from e
        return cls((h, w), meta["colour_mode"], mean, std, meta["resize"], meta.get("resize_mode", "stretch"),
                   meta.get("crop_fraction"), background, FitToContent.from_metadata(meta.get("fit_to_content")),
                   meta.get("jpeg_luma", False))


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
