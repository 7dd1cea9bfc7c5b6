"""A minibatch fed as M microbatches, one per clock, and its loss as the mean of theirs.

Microbatched DDG (``docs/design.md``, "Microbatched DDG") is a schedule: the executors run one
microbatch a clock and the stages step once per M clocks. What is left to the method is the
cutting of each minibatch into M equal microbatches and the one loss it reports for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddgpipe.core.values import Value, shard_value, tensors
from ddgpipe.errors import UsageError

__all__ = ["split_minibatch", "mean_loss"]


def _rows(x: Value | None, y: Tensor | None) -> int | None:
    if x is not None:
        return tensors(x)[0].shape[0] if tensors(x) else None
    return y.shape[0] if isinstance(y, Tensor) and y.dim() > 0 else None


def split_minibatch(x: Value | None, y: Tensor | None,
                    microbatches: int) -> list[tuple[Value | None, Tensor | None]]:
    """``(x, y)`` as ``microbatches`` consecutive slices of B / M rows (None stays None: a
    rank of the process runtime that holds neither); B % M != 0 is a UsageError."""
    if microbatches == 1:
        return [(x, y)]
    rows = _rows(x, y)
    if rows is not None and rows % microbatches:
        raise UsageError(f"a minibatch of {rows} samples does not split into {microbatches} "
                         f"equal microbatches; choose a batch size that is a multiple of "
                         f"{microbatches} (or microbatches that divide {rows})")
    size = (rows or 0) // microbatches
    return [(None if x is None else shard_value(x, i, microbatches),
             None if y is None else y[i * size: (i + 1) * size])
            for i in range(microbatches)]


def mean_loss(losses: list[Tensor | None]) -> Tensor | None:
    """The minibatch's loss: the mean of its microbatches' (None where this rank has none)."""
    if len(losses) == 1 or losses[0] is None:
        return losses[0]
    return torch.stack([loss for loss in losses if loss is not None]).mean()
