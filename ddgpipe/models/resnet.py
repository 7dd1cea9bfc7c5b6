"""CIFAR ResNets of He et al. (2016), section 4.2, with the parameter-free shortcut "option A".

Why and how: ``docs/design.md``, "The ResNets".
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["cifar_resnet", "resnet", "BasicBlock", "ShortcutA", "Stem", "Head"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}


def _check_dims(dims: int) -> None:
    if dims not in _CONV:
        raise ValueError(f"ResNet blocks are 1-D or 2-D (dims 1 or 2), got dims={dims}")


class ShortcutA(nn.Module):
    """Identity shortcut that subsamples by ``stride`` and zero-pads the extra channels.

    Works on any number of spatial dimensions: N x C x L signals and N x C x H x W images.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        spatial = x.dim() - 2
        if self.stride > 1:
            x = x[(slice(None), slice(None)) + (slice(None, None, self.stride),) * spatial]
        if self.pad != (0, 0):
            x = F.pad(x, (0, 0) * spatial + self.pad)
        return x


class BasicBlock(nn.Module):
    """Two size-3 conv-BN layers with a residual connection, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dims: int = 2):
        super().__init__()
        _check_dims(dims)
        conv, norm = _CONV[dims], _NORM[dims]
        self.conv1 = conv(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = norm(out_channels)
        self.shortcut = ShortcutA(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Stem(nn.Sequential):
    """Size-3 convolution to ``width`` (16) channels, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, width: int = 16, dims: int = 2):
        _check_dims(dims)
        super().__init__(
            _CONV[dims](in_channels, width, 3, 1, 1, bias=False),
            _NORM[dims](width),
            nn.ReLU(inplace=True),
        )


class Head(nn.Sequential):
    """Global average pooling and the linear classifier."""

    def __init__(self, in_features: int, num_classes: int, dims: int = 2):
        _check_dims(dims)
        super().__init__(_POOL[dims](1), nn.Flatten(), nn.Linear(in_features, num_classes))


def resnet(depth: int, in_channels: int, num_classes: int,
           widths: tuple[int, int, int] = (16, 32, 64), dims: int = 2) -> nn.Sequential:
    """``[stem, 3n basic blocks, head]`` with the three group ``widths``; depth = 6n+2."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    blocks: list[nn.Module] = [Stem(in_channels, widths[0], dims)]
    width = widths[0]
    for group, out_width in enumerate(widths):
        for i in range(n):
            stride = 2 if group > 0 and i == 0 else 1
            blocks.append(BasicBlock(width, out_width, stride, dims))
            width = out_width
    blocks.append(Head(width, num_classes, dims))
    model = nn.Sequential(*blocks)
    _init_weights(model)
    return model


def cifar_resnet(depth: int, in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """ResNet-``depth`` for small images; ``depth`` must be 6n+2 (20, 32, 44, 56, 110, ...)."""
    return resnet(depth, in_channels, num_classes)


def _init_weights(model: nn.Module) -> None:
    """He initialisation for convolutions (He et al. 2015), as the ResNet paper uses."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
