"""Scores on held-out data, through the pipeline's stages (or ranks): the same for every method."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ddgpipe.errors import UsageError
from ddgpipe.losses import logits_of
from ddgpipe.methods import Method

__all__ = ["evaluate", "bits_per_byte"]


def bits_per_byte(loss_nats: float) -> float:
    """A byte-level model's cross-entropy (nats per token) in bits per byte."""
    return loss_nats / math.log(2)


def evaluate(method: Method, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``method.model`` in eval mode (BatchNorm running
    stats, no dropout), through ``method.predict``: across the stages' devices, or, under the
    process runtime, through the ranks, where only the last rank gets the numbers (the others
    NaN). For ``[B, T, V]`` logits against ``[B, T]`` token ids both are per token."""
    model = method.model
    method.sync()
    was_training = model.training
    model.eval()
    loss_sum, correct, count, answered = 0.0, 0, 0, False
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out = logits_of(method.predict(x[i: i + batch_size]))
            if out is None:
                continue
            if not isinstance(out, Tensor):
                raise UsageError("the model ends on a tuple of tensors; evaluation needs one "
                                 "tensor of logits from the last block")
            answered = True
            logits = out.float()
            target = y[i: i + batch_size].to(logits.device)
            loss_sum += F.cross_entropy(logits.flatten(0, -2), target.flatten(),
                                        reduction="sum").item()
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
    model.train(was_training)
    if not answered:
        return float("nan"), float("nan")
    return loss_sum / count, correct / count
