"""Trace a module once with torch.export and cut it with torch's pipelining splitter.

torch does the tracing and the splitting (``torch.export`` and the ``Pipe`` of
``torch.distributed.pipelining``); this file only marks where new blocks begin, keeps the
user's module as it was, and turns torch's failures into a reason and a fix.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ddgpipe.core.rng import rng_kept
from ddgpipe.errors import UsageError

__all__ = ["traced_pipe", "TRACE_FIX"]

TRACE_FIX = ("name the split points yourself (split_points=[...], the submodules at which a "
             "new block begins), or give the model as an nn.Sequential of blocks")


def traced_pipe(model: nn.Module, args: tuple[Tensor, ...], kwargs: Mapping[str, Any],
                begins: Sequence[str], ends: Sequence[str]) -> tuple[Any, Any]:
    """torch's ``Pipe`` of ``model`` (a block begins at each module in ``begins`` and after
    each module in ``ends``) and the structure of the model's output (a pytree
    spec). The model's forwards, training flags and the random state are as they were
    afterwards."""
    from torch.distributed.pipelining._IR import Pipe

    with _split_marks(model, begins, ends), _training_mode(model), rng_kept():
        program = _export(model, args, kwargs)
    try:
        return Pipe._from_traced(model, program), program.call_spec.out_spec
    except Exception as error:  # torch's splitter raises assorted internal errors
        raise UsageError(f"torch's pipeline splitter could not cut {type(model).__name__} at "
                         f"{', '.join([*begins, *ends])}: {_first_line(error)}; "
                         f"{TRACE_FIX}") from error


def _export(model: nn.Module, args: tuple[Tensor, ...], kwargs: Mapping[str, Any]) -> Any:
    """The exported program, every dimension of every input left for torch to decide
    (``Dim.AUTO``), so that other batch sizes and sequence lengths run the same graph."""
    from torch.export import Dim

    shapes = (*[{d: Dim.AUTO for d in range(a.dim())} for a in args],
              *[{d: Dim.AUTO for d in range(v.dim())} if isinstance(v, Tensor) else None
                for v in kwargs.values()])
    try:
        return torch.export.export(model, args, dict(kwargs), dynamic_shapes=shapes)
    except Exception as error:  # export raises many kinds, all meaning "cannot trace"
        raise UsageError(f"torch.export cannot trace {type(model).__name__} "
                         f"({_first_line(error)}); {TRACE_FIX}") from error


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


@contextmanager
def _split_marks(model: nn.Module, begins: Sequence[str],
                 ends: Sequence[str]) -> Iterator[None]:
    """Patch the named submodules' forwards to call torch's ``pipe_split`` marker before
    (``begins``) or after (``ends``) them, restoring them on exit."""
    from torch.distributed.pipelining import pipe_split

    def marked(forward: Any, after: bool) -> Any:
        def split_forward(*a: Any, **k: Any) -> Any:
            if not after:
                pipe_split()
            out = forward(*a, **k)
            if after:
                pipe_split()
            return out
        return split_forward

    patched: list[tuple[nn.Module, Any]] = []
    try:
        for names, after in ((begins, False), (ends, True)):
            for name in names:
                module = model.get_submodule(name)
                patched.append((module, module.__dict__.get("forward")))
                module.forward = marked(module.forward, after)
        yield
    finally:
        for module, original in reversed(patched):
            if original is None:
                del module.forward
            else:
                module.forward = original


@contextmanager
def _training_mode(model: nn.Module) -> Iterator[None]:
    """Trace in training mode, so dropout and batch statistics are in the graph; every
    module's own flag is put back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
