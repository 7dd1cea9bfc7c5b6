"""Any traceable ``nn.Module`` as the ``nn.Sequential`` of blocks that DDG cuts: traced
once by torch, checked against the model's own output before it is handed back."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ddgpipe.core.values import Blocks, Value, as_args, describe
from ddgpipe.errors import UsageError
from ddgpipe.trace.candidates import check_split_points, repeated_blocks
from ddgpipe.trace.chain import TracedBlock, chain_wiring
from ddgpipe.trace.export import TRACE_FIX, traced_pipe
from ddgpipe.trace.huggingface import chosen_outputs, export_kwargs

__all__ = ["as_pipeline_blocks"]


def as_pipeline_blocks(model: nn.Module, example_inputs: Value,
                       split_points: Sequence[str] | None = None, *,
                       example_kwargs: Mapping[str, Any] | None = None) -> nn.Sequential:
    """``model`` as an ``nn.Sequential`` of blocks holding its own parameters (the same
    objects: training the blocks trains ``model``), traced once by torch on
    ``example_inputs`` (a batch of two or more, passed positionally). The result is a
    :class:`~ddgpipe.core.values.Blocks`: calling it runs the blocks in turn.

    A new block begins at each submodule named in ``split_points``; by default at each entry
    of the largest ``nn.ModuleList`` and after its last entry, so what runs before the list
    and after it are the first and last blocks. A HuggingFace causal LM runs without its
    cache and its last block returns the logits. An ``nn.Sequential`` is returned as it is.
    """
    if isinstance(model, nn.Sequential):
        return model
    if not isinstance(model, nn.Module):
        raise UsageError(f"expected an nn.Module to split into blocks, got {describe(model)}")
    args = _example_args(example_inputs)
    kwargs = {**export_kwargs(model), **(example_kwargs or {})}
    if split_points is None:
        begins = repeated_blocks(model)
        ends = begins[-1:]
    else:
        begins, ends = check_split_points(model, split_points), []
    pipe, out_spec = traced_pipe(model, args, kwargs, begins, ends)
    split = pipe.split_gm
    outputs = chosen_outputs(pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec),
                             model)
    names, wirings = chain_wiring(split, outputs)
    stages = [split.get_submodule(n) for n in names]
    for stage in stages:
        adopt_user_tensors(stage, model)
    blocks = Blocks(OrderedDict((str(i), TracedBlock(s, w, model))
                                for i, (s, w) in enumerate(zip(stages, wirings))))
    _check_same_output(blocks, model, args, kwargs, outputs)
    return blocks


def _example_args(example_inputs: Value) -> tuple[Tensor, ...]:
    """The example as positional arguments; a batch of one would fix the batch size."""
    args = as_args(example_inputs)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise UsageError(f"example_inputs must be a tensor or a tuple of tensors (a batch like "
                         f"the training ones), got {describe(example_inputs)}")
    if args[0].dim() > 0 and args[0].shape[0] < 2:
        raise UsageError(f"example_inputs has a batch of {args[0].shape[0]}; give a batch of "
                         "2 or more, so the trace keeps the batch size free")
    return args


def adopt_user_tensors(stage: nn.Module, model: nn.Module) -> None:
    """Make every parameter and buffer of ``stage`` the user's own object of the same name
    (torch's splitter copies a parameter that two stages use); fail if one is not the
    user's."""
    users = {**dict(model.named_parameters(remove_duplicate=False)),
             **dict(model.named_buffers(remove_duplicate=False))}
    for path, sub in stage.named_modules():
        prefix = f"{path}." if path else ""
        for table in (sub._parameters, sub._buffers):
            for name, tensor in table.items():
                own = users.get(prefix + name)
                if own is not None and own is not tensor:
                    table[name] = own
    for sub in stage.modules():
        finalize = getattr(sub, "finalize", None)
        if finalize is not None:  # torch.export's InterpreterModule keeps compiled code too
            finalize()
    ids = {id(t) for t in users.values()}
    foreign = [n for n, p in stage.named_parameters() if id(p) not in ids]
    if foreign:
        raise RuntimeError(f"traced block holds parameters that are not the model's: {foreign}")


def _check_same_output(blocks: Blocks, model: nn.Module, args: tuple[Tensor, ...],
                       kwargs: Mapping[str, Any], outputs: list[int] | None) -> None:
    """Refuse blocks that do not give the model's own output on the example (evaluation
    mode, so nothing random is drawn and no statistic moves). Gradients stay on: without
    them torch's own layers (nn.TransformerEncoder) take a fused inference path that the
    traced training graph does not, and differ in the last bits."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            expected = pytree.tree_leaves(model(*args, **kwargs))
            got = as_args(blocks(*args))
    finally:
        for module, flag in flags:
            module.training = flag
    if outputs is not None:
        expected = [expected[i] for i in outputs]
    same = len(got) == len(expected) and all(
        isinstance(e, Tensor) and g.shape == e.shape and torch.equal(g, e)
        for g, e in zip(got, expected))
    if not same:
        raise UsageError(f"the traced blocks of {type(model).__name__} do not reproduce its "
                         "output on the example in evaluation mode (its forward depends on "
                         f"something the trace fixed); {TRACE_FIX}")
