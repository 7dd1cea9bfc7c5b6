"""ResNets for 1-D signals (MNIST-1D: 1 x 40), built like the CIFAR ResNets of ``resnet.py``.

Why and how: ``docs/design.md``, "ResNets for 1-D signals".
"""

from __future__ import annotations

from torch import nn

from ddgpipe.models.resnet import resnet

__all__ = ["resnet1d", "WIDTHS_1D"]

WIDTHS_1D = (16, 32, 64)


def resnet1d(depth: int, in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """ResNet-``depth`` for N x C x L signals; ``depth`` must be 6n+2 (20, 32, 44, 56, 110)."""
    return resnet(depth, in_channels, num_classes, widths=WIDTHS_1D, dims=1)
