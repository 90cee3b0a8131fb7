"""The evaluation preprocessing in torch: the contract's ``Preprocessing`` (``contract``), which export writes into
the model's metadata, plus the one normalisation the training loop, evaluation and export all use.

The service reproduces the same steps without torch from the metadata alone; a test holds the two to 1e-6.
"""

from __future__ import annotations

import torch
from PIL import Image

import contract
from contract import to_colour_mode  # noqa: F401 - re-exported for model code that converts images


def normaliser(pre: contract.Preprocessing, device: torch.device | str = "cpu"):
    """uint8 pixels (N, C, H, W) or (C, H, W) -> float32 on ``device``, scaled to [0, 1], then (x - mean) / std."""
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32, device=device).view(-1, 1, 1)
    return lambda pixels: (pixels.to(torch.float32) / 255.0 - mean) / std


class Preprocessing(contract.Preprocessing):
    """``contract.Preprocessing`` with torch tensors out."""

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return normaliser(self, pixels.device)(pixels)

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.to_array(img).copy())  # (C, H, W) uint8

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> float32 tensor (C, H, W), ready for the network."""
        return self.normalise(self.to_uint8(img))
