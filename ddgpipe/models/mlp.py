"""A plain multilayer perceptron, as a flat stack of (Linear, BatchNorm, ReLU) blocks.

Useful as a fast, shallow baseline and for cutting tests: every hidden layer is one block.
"""

from __future__ import annotations

from torch import nn

__all__ = ["mlp"]


def mlp(
    in_features: int, num_classes: int = 10, hidden: int = 256, depth: int = 4
) -> nn.Sequential:
    """``depth`` hidden blocks of width ``hidden``, then a linear classifier block."""
    if depth < 1 or hidden < 1:
        raise ValueError(f"mlp needs depth >= 1 and hidden >= 1, got {depth} and {hidden}")
    blocks: list[nn.Module] = []
    width = in_features
    for i in range(depth):
        layers: list[nn.Module] = [nn.Flatten()] if i == 0 else []
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        blocks.append(nn.Sequential(*layers))
        width = hidden
    blocks.append(nn.Linear(width, num_classes))
    return nn.Sequential(*blocks)
