"""Losses a pipeline's last stage can end on, beyond ``F.cross_entropy`` of ``[B, C]`` logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["token_cross_entropy", "logits_of"]


def logits_of(output: Any) -> Any:
    """A model's logits: the output itself, or its ``logits`` when it is a mapping that has
    them (a HuggingFace ``ModelOutput``); anything else is returned as it is."""
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    return output


def token_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy of ``[B, T, V]`` logits against ``[B, T]`` token ids (or
    of any ``[..., V]`` against ``[...]``), in float32 whatever the logits' precision; targets
    equal to ``ignore_index`` (padding) count for nothing."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} need targets of shape "
                         f"{tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                           ignore_index=ignore_index)
