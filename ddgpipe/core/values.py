"""What travels between blocks and stages: one tensor, or a tuple of tensors.

A block takes the previous block's output (a tuple is passed as positional arguments) and
returns a tensor or a tuple of tensors. Floating tensors that require grad carry gradients
back; the others (token ids, masks, positions) travel forward only. A stage hands its output
on *detached*, each tensor marked with whether a gradient will come back for it
(:func:`handed_on`), and the next stage makes its inputs leaves from those marks
(:func:`leaves`): a gradient flows exactly where the model's own graph had one.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ddgpipe.errors import UsageError

__all__ = ["Value", "CONTRACT", "as_args", "tensors", "rebuild", "check_value", "handed_on",
           "leaves", "differentiable", "map_tensors", "shard_value", "Blocks", "grad_probe",
           "call_block"]

Value = Tensor | tuple[Tensor, ...]
"""A tensor or a tuple of tensors: the output of a block, the input of the next."""

CONTRACT = ("each block takes the previous block's output (a tensor, or a tuple of tensors "
            "passed as its positional arguments) and returns a tensor or a tuple of tensors")


def as_args(value: Value) -> tuple[Tensor, ...]:
    """The positional arguments a block is called with."""
    return value if isinstance(value, tuple) else (value,)


def tensors(value: Value) -> list[Tensor]:
    return list(value) if isinstance(value, tuple) else [value]


def rebuild(value: Value, parts: Iterable[Tensor]) -> Value:
    """``parts`` in the structure of ``value``: a tuple if it was one, else the one tensor."""
    parts = tuple(parts)
    return parts if isinstance(value, tuple) else parts[0]


def map_tensors(value: Value, fn: Callable[[Tensor], Tensor]) -> Value:
    return rebuild(value, (fn(t) for t in tensors(value)))


def describe(value: object) -> str:
    """A value as an error message shows it: type, and shapes and dtypes of tensors."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    if isinstance(value, tuple):
        return "a tuple of " + ", ".join(describe(v) for v in value) if value else "()"
    return f"a {type(value).__name__}"


def check_value(value: object, what: str) -> Value:
    """``value`` if it is a tensor or a non-empty tuple of tensors, else a UsageError naming
    ``what`` produced it and the contract."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple) and value and all(isinstance(v, Tensor) for v in value):
        return value
    fix = ("return only tensors (drop the None, or keep it inside the block)"
           if isinstance(value, tuple) else "wrap it to return its tensors as a tuple")
    raise UsageError(f"{what} returned {describe(value)}; {CONTRACT}: {fix}")


def differentiable(t: Tensor) -> bool:
    """Whether a gradient comes back for ``t``: a floating tensor that requires grad."""
    return t.requires_grad and (t.is_floating_point() or t.is_complex())


def handed_on(value: Value, floating: bool = False) -> Value:
    """``value`` detached from this stage's graph, each tensor marked (``requires_grad``) with
    whether its gradient will be sent back: where the graph has one, or, with ``floating``
    (a forward that kept no graph), on every floating tensor."""
    def mark(t: Tensor) -> Tensor:
        carries = t.is_floating_point() if floating else differentiable(t)
        return t.detach().requires_grad_(carries)
    return map_tensors(value, mark)


def leaves(value: Value, grad: bool) -> Value:
    """Fresh leaves of a received ``value``: the marked ones require grad when ``grad``."""
    return map_tensors(value, lambda t: t.detach().requires_grad_(grad and differentiable(t)))


def shard_value(value: Value, index: int, parts: int) -> Value:
    """Rows ``[index n / parts, (index + 1) n / parts)`` of every tensor."""
    def shard(t: Tensor) -> Tensor:
        size = t.shape[0] // parts
        return t[index * size: (index + 1) * size]
    return map_tensors(value, shard)


def grad_probe(value: Value) -> Tensor | None:
    """A scalar whose backward reaches every differentiable tensor of ``value`` (None when no
    tensor is): what profiling backpropagates when there is no loss."""
    parts = [t.float().sum() for t in tensors(value) if differentiable(t)]
    return torch.stack(parts).sum() if parts else None


def call_block(block: nn.Module, name: str, args: tuple[Tensor, ...]) -> Value:
    """``block(*args)``, its output checked; a mismatch named in a :class:`UsageError`."""
    try:
        out = block(*args)
    except TypeError:
        try:
            inspect.signature(block.forward).bind(*args)
        except TypeError as mismatch:
            raise UsageError(
                f"block {name} ({type(block).__name__}) cannot take "
                f"{describe(args if len(args) > 1 else args[0])} ({mismatch}); {CONTRACT}: "
                "make the block before it return what this one takes, or wrap this one"
            ) from None
        raise
    return check_value(out, f"block {name} ({type(block).__name__})")


class Blocks(nn.Sequential):
    """A stage's slice of the model: its blocks in order, a tuple passed between them as
    positional arguments, each output checked against the contract. Parameter names are the
    whole model's (``"4.conv1.weight"``), so state dicts of the slices merge into the model's."""

    def __init__(self, blocks: OrderedDict[str, nn.Module]):
        super().__init__(blocks)

    def forward(self, *inputs: Tensor) -> Value:
        out: Value = inputs if len(inputs) > 1 else inputs[0]
        for name, block in self._modules.items():
            assert block is not None
            out = call_block(block, name, as_args(out))
        return out
