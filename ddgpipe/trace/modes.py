"""Keep train() and eval() working on a traced block.

torch.export writes the training flag into the graph as a constant (``dropout(x, p,
train=True)``). Each op below reads it again at every call from the module that called it in
the user's model, as the eager code does (``p if self.training else 0.0``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["follow_training", "FollowsTraining", "rebind_owners", "recompile"]

_TRAIN_FLAG_OPS = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
                   "native_dropout", "rrelu", "rrelu_with_noise", "batch_norm",
                   "instance_norm"}
"""ATen ops whose ``train``/``training`` argument is the calling module's ``self.training``."""

_DROPOUT_P_OPS = {"scaled_dot_product_attention"}
"""ATen ops whose ``dropout_p`` argument is ``p if self.training else 0.0`` in eager code.
A BatchNorm's in-place updates of its buffers (``num_batches_tracked``) run in training
mode only, as in its eager forward."""

_RUNNING_STATS = ("running_mean", "running_var")


class FollowsTraining:
    """An ATen op whose mode argument (position ``slot``) is read from ``owner.training`` at
    each call: ``when_training`` in training mode, ``when_evaluating`` otherwise. Without a
    slot, the op runs in training mode only (an in-place update of a statistic)."""

    def __init__(self, op: Any, owner: nn.Module, slot: int | None, when_training: Any = None,
                 when_evaluating: Any = None):
        self.op, self.owner, self.slot = op, owner, slot
        self.when_training, self.when_evaluating = when_training, when_evaluating
        self.__name__ = f"{op.__name__.replace('.', '_')}_following_training"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.slot is None:
            return self.op(*args, **kwargs) if self.owner.training else args[0]
        mode = self.when_training if self.owner.training else self.when_evaluating
        name = self.op._schema.arguments[self.slot].name
        if self.slot < len(args):
            args = (*args[:self.slot], mode, *args[self.slot + 1:])
        else:
            kwargs = {**kwargs, name: mode}
        return self.op(*args, **kwargs)


def follow_training(stage: nn.Module, model: nn.Module) -> tuple[list[nn.Module], bool]:
    """Rewrite ``stage``'s mode-dependent ops to follow their owners in ``model``; return
    the owners (whose flags a block's ``train()`` sets) and whether the stage draws random
    numbers (any op torch tags ``nondeterministic_seeded``)."""
    owners: dict[int, nn.Module] = {}
    random = False
    for path, sub in stage.named_modules():
        graph = getattr(sub, "graph", None)
        if not isinstance(graph, fx.Graph):
            continue
        owner = _owner(model, path)
        changed = False
        for node in graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            random |= torch.Tag.nondeterministic_seeded in node.target.tags
            rewritten = _following(node, owner)
            if rewritten is not None:
                node.target, changed = rewritten, True
                owners[id(owner)] = owner
        if changed:
            recompile(sub)
    return list(owners.values()), random


def rebind_owners(stage: nn.Module, owners: Mapping[int, nn.Module]) -> None:
    """After ``stage`` was copied, make its mode-following ops read the copies of their
    owners (``owners`` maps ``id(original)`` to the copy): torch.fx copies a graph's nodes
    but not their targets."""
    for sub in stage.modules():
        graph = getattr(sub, "graph", None)
        if not isinstance(graph, fx.Graph):
            continue
        changed = False
        for node in graph.nodes:
            old = node.target
            if isinstance(old, FollowsTraining) and id(old.owner) in owners:
                node.target = FollowsTraining(old.op, owners[id(old.owner)], old.slot,
                                              old.when_training, old.when_evaluating)
                changed = True
        if changed:
            recompile(sub)


def _following(node: fx.Node, owner: nn.Module) -> FollowsTraining | None:
    """The mode-following replacement for ``node``, or None when its op has no mode."""
    op = node.target
    kind = op._schema.name.split("::")[-1]  # type: ignore[union-attr]
    names = [a.name for a in op._schema.arguments]  # type: ignore[union-attr]
    traced = dict(zip(names, node.args))
    traced.update(node.kwargs)
    if kind in _TRAIN_FLAG_OPS:
        slot = next(i for i, n in enumerate(names) if n in ("train", "training"))
        if kind in ("batch_norm", "instance_norm") and any(
                traced.get(s) is None for s in _RUNNING_STATS):
            return None  # no running statistics: batch statistics in both modes
        if traced.get(names[slot]) is not True:
            return None  # traced in training mode but not training: a fixed choice
        return FollowsTraining(op, owner, slot, True, False)
    if kind in _DROPOUT_P_OPS:
        slot = names.index("dropout_p")
        p = traced.get("dropout_p", 0.0)
        return FollowsTraining(op, owner, slot, p, 0.0) if p else None
    if isinstance(owner, _NormBase) and _updates_a_buffer(node):
        return FollowsTraining(op, owner, None)  # num_batches_tracked += 1
    return None


def _updates_a_buffer(node: fx.Node) -> bool:
    """Whether ``node`` writes in place to a tensor the module holds (a ``get_attr``)."""
    first = node.target._schema.arguments[0]  # type: ignore[union-attr]
    target = node.args[0] if node.args else None
    return (first.alias_info is not None and first.alias_info.is_write
            and isinstance(target, fx.Node) and target.op == "get_attr")


def _owner(model: nn.Module, path: str) -> nn.Module:
    """The user's module at ``path`` (an outlined submodule mirrors its name), or its
    nearest existing ancestor."""
    atoms = path.split(".") if path else []
    while atoms:
        try:
            return model.get_submodule(".".join(atoms))
        except AttributeError:
            atoms.pop()
    return model


def recompile(module: nn.Module) -> None:
    """Regenerate the code of a graph module whose nodes were rewritten."""
    finalize: Callable[[], None] | None = getattr(module, "finalize", None)
    if finalize is not None:  # torch.export's InterpreterModule
        finalize()
    elif isinstance(module, fx.GraphModule):
        module.recompile()
