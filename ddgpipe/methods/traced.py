"""The blocks a pipelined method cuts: an ``nn.Sequential`` as it is, any other module traced
by torch (:mod:`ddgpipe.trace`) into blocks that hold the user's own parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ddgpipe.core.values import Value, describe
from ddgpipe.errors import UsageError
from ddgpipe.trace import as_pipeline_blocks
from ddgpipe.trace.huggingface import CausalLMLogits, example_token_ids, is_causal_lm

__all__ = ["pipeline_blocks", "backprop_forward", "stage_weights", "load_weights"]


def pipeline_blocks(model: nn.Module, stages: int, *, sample_input: Value | None,
                    split_points: Sequence[str] | None) -> nn.Sequential:
    """``model`` as the blocks the stages are cut from.

    An ``nn.Sequential`` is returned as it is (today's path, bitwise). Any other module is
    traced on ``sample_input``, or, for a HuggingFace causal LM given none, on token ids
    drawn from its vocabulary; a block begins at each entry of its largest ``nn.ModuleList``
    (the balance modes choose among those boundaries) or, with ``split_points``, a stage
    begins at each submodule named there. A parameter the user ties across blocks stays one
    ``nn.Parameter`` held by each (``ddgpipe.balance.shared.shared_tensors`` lists them):
    the stages see the tie as they would in a hand-written Sequential.
    """
    if isinstance(model, nn.Sequential):
        if split_points is not None:
            raise UsageError("split_points names the submodules of a model that is traced; "
                             "an nn.Sequential is cut between its entries: pass split=[...] "
                             "(block indices) instead")
        return model
    if not isinstance(model, nn.Module):
        raise UsageError(f"expected an nn.Module to train, got {describe(model)}")
    if split_points is not None and not isinstance(split_points, str) \
            and len(split_points) != stages - 1:
        raise UsageError(f"split_points names {len(split_points)} submodules, which makes "
                         f"{len(split_points) + 1} stages, but {stages} stages were asked for; "
                         f"name {stages - 1} (each the submodule at which a stage begins)")
    example = sample_input if sample_input is not None else example_token_ids(model)
    if example is None:
        raise UsageError(f"{type(model).__name__} is not an nn.Sequential, so it is traced "
                         "into blocks on an example batch: pass sample_input= (a batch like "
                         "the training ones, two or more rows), or give the model as an "
                         "nn.Sequential of blocks")
    return as_pipeline_blocks(model, example, split_points)


def backprop_forward(model: nn.Module) -> nn.Module:
    """What backprop calls on a batch: a HuggingFace causal LM without its cache, returning
    its logits (as its traced blocks do); any other module as it is."""
    return CausalLMLogits(model) if is_causal_lm(model) else model


def stage_weights(model: nn.Module, held: nn.Module) -> dict[str, Tensor]:
    """The entries of ``model``'s state dict that ``held`` (one stage) holds, on the CPU,
    under the model's own names."""
    names = {id(t): name for name, t in model.state_dict(keep_vars=True).items()}
    return {names[id(t)]: t.detach().cpu().clone()
            for t in [*held.parameters(), *held.buffers()] if id(t) in names}


def load_weights(model: nn.Module, parts: Sequence[dict[str, Tensor]]) -> None:
    """Copy every stage's :func:`stage_weights` into ``model``, in place (the user's tensor
    objects stay theirs)."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for part in parts:
            for name, value in part.items():
                state[name].copy_(value)
