"""A stage's forward through ``torch.compile``, one thread at a time where it compiles.

The stage's slice runs as ``functional_call(module, weights, args)`` with the weights as
inputs, so a new weight version (a stash snapshot) reuses the compiled graph instead of
compiling again. torch.compile is not thread safe (pytorch/pytorch#118260, #136833), so a
call whose inputs the function has not seen yet (grad mode, training mode, which weights,
shapes, dtypes, devices: what its guards depend on) takes a process-wide lock, and so does
the first backward through each of its graphs; calls it has seen run free, in parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ddgpipe.core.values import Value

__all__ = ["CompiledForward", "COMPILE_LOCK"]

COMPILE_LOCK = threading.RLock()

_FACTORY = """
def make(module, functional_call):
    def stage_forward(weights, *args):
        return functional_call(module, dict(weights), args, strict=False)
    return stage_forward
"""


def _functional_forward(module: nn.Module) -> Callable[..., Value]:
    """``(weights, *args) -> functional_call(module, weights, args)`` with a code object of
    its own: dynamo keeps its compiled graphs per code object, and with one function for
    every stage their guards would fail in turn and exhaust its recompile limit."""
    namespace: dict = {}
    exec(compile(_FACTORY, f"<ddgpipe stage forward {id(module):x}>", "exec"), namespace)
    return namespace["make"](module, functional_call)


class CompiledForward:
    """``module``'s functional forward, compiled on first use; ``(out, key)`` per call."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._fn = torch.compile(_functional_forward(module), dynamic=False)
        self._seen: set[Hashable] = set()
        self._backward_seen: set[Hashable] = set()

    def key(self, weights: Mapping[str, Tensor], args: tuple[Tensor, ...]) -> Hashable:
        return (torch.is_grad_enabled(), self.module.training, tuple(weights),
                tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) for a in args))

    def __call__(self, weights: Mapping[str, Tensor], args: tuple[Tensor, ...]
                 ) -> tuple[Value, Hashable]:
        key = self.key(weights, args)
        if key in self._seen:
            return self._fn(weights, *args), key
        with COMPILE_LOCK:
            out = self._fn(weights, *args)
            self._seen.add(key)
        return out, key

    def backward_needs_lock(self, key: Hashable | None) -> bool:
        """Whether the backward of a forward with ``key`` may compile (its first one)."""
        return key is not None and key not in self._backward_seen

    def backward_done(self, key: Hashable | None) -> None:
        if key is not None:
            self._backward_seen.add(key)
