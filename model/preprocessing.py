"""The evaluation preprocessing, defined once and written into the exported model's metadata.

The service re-implements exactly this (without torch) from the metadata alone; a test checks the
two agree to 1e-6 on the same images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
COLOUR_MODES = {"L": 1, "RGB": 3}


def to_colour_mode(img: Image.Image, mode: str) -> Image.Image:
    """Apply EXIF orientation, flatten transparency onto black, scale 16-bit to 8-bit, convert to ``mode``.

    Black is the background because the default model reads white ink on black (scikit-learn digits).
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
        arr = np.asarray(img, dtype=np.int64)
        img = Image.fromarray((arr >> 8).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert(mode)


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int]  # (H, W) the network sees
    colour_mode: str  # "L" (1 channel) or "RGB" (3 channels)
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    resize: str = "bilinear"  # Pillow filter used to stretch the image to input_size

    def __post_init__(self) -> None:
        if self.colour_mode not in COLOUR_MODES:
            raise ValueError(f"colour_mode must be one of {sorted(COLOUR_MODES)}, got {self.colour_mode!r}")
        if self.resize not in RESAMPLE:
            raise ValueError(f"resize must be one of {sorted(RESAMPLE)}, got {self.resize!r}")
        channels = COLOUR_MODES[self.colour_mode]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values for mode {self.colour_mode}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def channels(self) -> int:
        return COLOUR_MODES[self.colour_mode]

    def resized(self, img: Image.Image) -> Image.Image:
        """The image in the model's colour mode at the model's input size (still 8-bit)."""
        img = to_colour_mode(img, self.colour_mode)
        h, w = self.input_size
        if img.size != (w, h):
            img = img.resize((w, h), RESAMPLE[self.resize])
        return img

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) or (C, H, W) -> float32, scaled to [0, 1], then (x - mean) / std."""
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32).view(shape)
        return (pixels.to(torch.float32) / 255.0 - mean) / std

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(self.resized(img), dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (C, H, W)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> float32 tensor (C, H, W), ready for the network."""
        return self.normalise(self.to_uint8(img))

    def to_metadata(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d
