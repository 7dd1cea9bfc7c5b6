"""Models by name, for the CLI and configs."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ddgpipe.errors import UsageError
from ddgpipe.models.gpt import GPTConfig, gpt
from ddgpipe.models.mlp import mlp
from ddgpipe.models.resnet import cifar_resnet
from ddgpipe.models.resnet1d import resnet1d

__all__ = ["MODEL_NAMES", "build_model", "is_language_model"]

RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
RESNET1D_DEPTHS = {f"resnet1d-{d}": d for d in (20, 32, 44, 56, 110)}
MODEL_NAMES = (*RESNET_DEPTHS, *RESNET1D_DEPTHS, "mlp", "gpt-L")
"""``gpt-L`` stands for a GPT of L blocks, e.g. ``gpt-8``."""


def is_language_model(name: str) -> bool:
    return name.startswith("gpt-")


def build_model(
    name: str, in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
    input_shape: tuple[int, ...] | None = None, **gpt_options: Any,
) -> nn.Sequential:
    """A fresh model (weights from the global torch RNG) as a flat ``nn.Sequential``.

    ``input_shape``, one sample's shape (``Dataset.input_shape``), overrides ``in_channels``
    and ``image_size``: (C, H, W) images for the ResNets, (C, L) signals for the ResNet1Ds, any
    shape for the MLP; a model given the wrong kind fails here. Without it, a model is built
    for C x ``image_size`` x ``image_size`` images (a ResNet1D for C-channel signals).
    """
    if name in RESNET_DEPTHS:
        _check_rank(name, input_shape, 2, "C x H x W images", "a resnet1d-N or mlp")
        channels = input_shape[0] if input_shape else in_channels
        return cifar_resnet(RESNET_DEPTHS[name], channels, num_classes)
    if name in RESNET1D_DEPTHS:
        _check_rank(name, input_shape, 1, "C x L signals", "a resnet20/32/44/56/110 or mlp")
        channels = input_shape[0] if input_shape else in_channels
        return resnet1d(RESNET1D_DEPTHS[name], channels, num_classes)
    if name == "mlp":
        shape = input_shape or (in_channels, image_size, image_size)
        return mlp(math.prod(shape), num_classes)
    if is_language_model(name):
        layers = name.removeprefix("gpt-")
        if not layers.isdigit() or int(layers) < 1:
            raise UsageError(f"unknown model {name!r}: gpt-L takes the number of blocks L, "
                             "e.g. --model gpt-8")
        if input_shape is not None and len(input_shape) != 1:
            raise UsageError(f"model {name} takes windows of token ids, not inputs of shape "
                             f"{tuple(input_shape)}; use it with --data shakespeare")
        given = {k: v for k, v in gpt_options.items() if v is not None}
        context = given.pop("context", input_shape[0] if input_shape else 128)
        return gpt(GPTConfig(layers=int(layers), vocab=num_classes, context=context, **given))
    if name.startswith("resnet1d"):
        depths = ", ".join(str(d) for d in RESNET1D_DEPTHS.values())
        raise UsageError(f"unknown model {name!r}: resnet1d-N takes depth N in {depths} (6n+2, "
                         "as the CIFAR ResNets); e.g. --model resnet1d-20")
    raise UsageError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def _check_rank(name: str, input_shape: tuple[int, ...] | None, spatial: int, takes: str,
                instead: str) -> None:
    if input_shape is not None and len(input_shape) != spatial + 1:
        raise UsageError(f"model {name} cannot take inputs of shape {tuple(input_shape)}: it is "
                         f"a {spatial}-D network for {takes}; use {instead} for this data")
