"""Residual networks as defined by He et al. 2015, "Deep Residual Learning for Image Recognition".

Architecture only: no training, devices, logging or preprocessing live here.

A residual block computes a[l+2] = g(z[l+2] + a[l]). If the branch's weights and biases are zero,
z[l+2] = 0 and the block returns g(a[l]) = a[l] for the non-negative a[l] a ReLU produced: the
identity is trivially reachable, which is why extra blocks do not hurt (Sec. 3.1). The ``plain``
variant removes the skip and so cannot fall back to the identity (the degradation problem, Fig. 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ShortcutType = Literal["A", "B"]
SHORTCUT_TYPES = ("A", "B")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 "same" convolution (padding 1), no bias because batch norm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias because batch norm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A (Sec. 4.2): parameter-free shortcut; subsample by the stride, zero-pad new channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option A shortcut cannot reduce channels ({in_planes} -> {out_planes})")
        self.stride = stride
        self.extra = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # x: (N, C_in, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # x: (N, C_out, H/s, W/s)


def projection(in_planes: int, out_planes: int, stride: int, shortcut: ShortcutType) -> nn.Module:
    """The shortcut Ws of Eq. 2 for a block whose output shape differs from its input."""
    if shortcut == "A":
        return PadShortcut(in_planes, out_planes, stride)
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (Fig. 2); used by resnet18/34 and the CIFAR nets."""

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut: ShortcutType = "B", residual: bool = True
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, out_planes)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.residual = residual
        self.downsample: nn.Module | None = None  # the shortcut Ws; torchvision's name, so its weights load
        if residual and (stride != 1 or in_planes != out_planes):
            self.downsample = projection(in_planes, out_planes, stride, shortcut)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): the residual branch alone, before the addition."""
        z = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        z = self.branch(x)
        if self.residual:
            z = z + identity
        return F.relu(z)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (Fig. 5 right); used by resnet50 and deeper.

    The stride sits on the 3x3 convolution, as in torchvision ("ResNet v1.5"); the paper puts it on
    the first 1x1. Parameter counts are identical; v1.5 is slightly more accurate.
    """

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut: ShortcutType = "B", residual: bool = True
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.residual = residual
        self.downsample: nn.Module | None = None  # the shortcut Ws, named as in torchvision
        if residual and (stride != 1 or in_planes != out_planes):
            self.downsample = projection(in_planes, out_planes, stride, shortcut)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.bn1(self.conv1(x)))
        z = F.relu(self.bn2(self.conv2(z)))
        return self.bn3(self.conv3(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        z = self.branch(x)
        if self.residual:
            z = z + identity
        return F.relu(z)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """A stem, stages of blocks (the first block of each later stage halves H and W), pooling, a classifier.

    ``stem="cifar"``: one 3x3 conv, no pooling (Sec. 4.2). ``stem="imagenet"``: 7x7/2 conv and 3x3/2 max
    pooling (Table 1).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        stem: Literal["cifar", "imagenet"] = "cifar",
        shortcut: ShortcutType = "B",
        residual: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers and widths must be non-empty and equally long, got {layers} and {widths}")
        if any(n < 1 for n in layers):
            raise ValueError(f"every stage needs at least one block, got {list(layers)}")
        if shortcut not in SHORTCUT_TYPES:
            raise ValueError(f"shortcut must be one of {SHORTCUT_TYPES}, got {shortcut!r}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")

        # Module names and registration order follow torchvision's ResNet, so its state dicts load strictly
        # into resnet18/34/50; the CIFAR nets use the same scheme (conv1, bn1, layer1..3, fc).
        self.in_planes = widths[0]
        if stem == "cifar":
            self.conv1 = conv3x3(in_channels, widths[0])
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.num_stages = len(layers)
        for i, (n, width) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(self.in_planes, width, stride if j == 0 else 1, shortcut, residual))
                self.in_planes = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.in_planes, num_classes)

        # He et al. 2015, "Delving Deep into Rectifiers": init for ReLU nets.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 5.1: a zero scale on the last BN of
        # each branch makes every block start as the identity -- the lecture's argument as an init.
        # Pointless without skips, so the plain net ignores it.
        if zero_init_residual and residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def blocks(self) -> list[BasicBlock | Bottleneck]:
        return [m for m in self.modules() if isinstance(m, (BasicBlock, Bottleneck))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)  # x: (N, C0, H', W'); the identity for the CIFAR stem
        for stage in self.stages():  # each stage after the first halves H and W
            x = stage(x)  # x: (N, C_last, H'/2^(S-1), W'/2^(S-1)) after the last of S stages
        x = torch.flatten(self.avgpool(x), 1)  # x: (N, C_last)
        return self.fc(x)  # logits: (N, num_classes)


def cifar_resnet(depth: int, **kwargs) -> ResNet:
    """The 6n+2-layer CIFAR nets of Sec. 4.2: three stages of n basic blocks, 16/32/64 filters."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    kwargs.setdefault("shortcut", "A")
    return ResNet(BasicBlock, [n, n, n], [16, 32, 64], stem="cifar", **kwargs)


def imagenet_resnet(block: Block, layers: Sequence[int], **kwargs) -> ResNet:
    """The ImageNet nets of Table 1: four stages, 64/128/256/512 filters."""
    kwargs.setdefault("shortcut", "B")
    return ResNet(block, layers, [64, 128, 256, 512], stem="imagenet", **kwargs)


ARCHS: dict[str, Callable[..., ResNet]] = {
    "resnet20": lambda **kw: cifar_resnet(20, **kw),
    "resnet32": lambda **kw: cifar_resnet(32, **kw),
    "resnet44": lambda **kw: cifar_resnet(44, **kw),
    "resnet56": lambda **kw: cifar_resnet(56, **kw),
    "resnet110": lambda **kw: cifar_resnet(110, **kw),
    "resnet18": lambda **kw: imagenet_resnet(BasicBlock, [2, 2, 2, 2], **kw),
    "resnet34": lambda **kw: imagenet_resnet(BasicBlock, [3, 4, 6, 3], **kw),
    "resnet50": lambda **kw: imagenet_resnet(Bottleneck, [3, 4, 6, 3], **kw),
}


def build(arch: str, **kwargs) -> ResNet:
    """Build a net by name; ``arch`` may be ``resnetN`` (any CIFAR depth 6n+2) or one of ``ARCHS``."""
    if arch in ARCHS:
        return ARCHS[arch](**kwargs)
    if arch.startswith("resnet") and arch[len("resnet") :].isdigit():
        return cifar_resnet(int(arch[len("resnet") :]), **kwargs)
    raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)} or resnet<6n+2>")
