"""ResNets for 1-D signals (MNIST-1D: 1 x 40), built like the CIFAR ResNets of ``resnet.py``.

Same layout, same blocks with Conv1d/BatchNorm1d: a size-3 stem, three groups of n basic
blocks (depth 6n+2), the first block of groups two and three halving the length with an
option-A shortcut (every second sample, new channels zero-padded: no parameters), global
average pooling and a linear classifier, as one flat ``nn.Sequential``
``[stem, block_1, ..., block_3n, head]`` that DDG can cut between any two entries.

Widths 16, 32, 64, as the CIFAR ResNets, with lengths 40 -> 20 -> 10: the last group's
receptive field is wider than the whole signal, and global pooling then ignores where the
(randomly translated) digit sits. Doubling the widths (32, 64, 128) was measured to buy
nothing here: ResNet-20-1D, 30 epochs of backprop on the 4000 training signals, reached the
same test accuracy (98.83% vs 98.80%, one seed) in twice the time. At depth 20 the model
has 91k parameters and about 1.2M multiply-adds per signal.
"""

from __future__ import annotations

from torch import nn

from ddgpipe.models.resnet import resnet

__all__ = ["resnet1d", "WIDTHS_1D"]

WIDTHS_1D = (16, 32, 64)


def resnet1d(depth: int, in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """ResNet-``depth`` for N x C x L signals; ``depth`` must be 6n+2 (20, 32, 44, 56, 110)."""
    return resnet(depth, in_channels, num_classes, widths=WIDTHS_1D, dims=1)
