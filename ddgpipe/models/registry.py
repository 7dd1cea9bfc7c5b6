"""Models by name, for the CLI and configs."""

from __future__ import annotations

from torch import nn

from ddgpipe.errors import UsageError
from ddgpipe.models.mlp import mlp
from ddgpipe.models.resnet import cifar_resnet

__all__ = ["MODEL_NAMES", "build_model"]

RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
MODEL_NAMES = (*RESNET_DEPTHS, "mlp")


def build_model(
    name: str, in_channels: int = 3, image_size: int = 32, num_classes: int = 10
) -> nn.Sequential:
    """A fresh model (weights from the global torch RNG) as a flat ``nn.Sequential``."""
    if name in RESNET_DEPTHS:
        return cifar_resnet(RESNET_DEPTHS[name], in_channels, num_classes)
    if name == "mlp":
        return mlp(in_channels * image_size * image_size, num_classes)
    raise UsageError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
