"""Turn torch's split graph (stages that may read any earlier stage's outputs) into a chain
of blocks, each taking the previous block's output: what a later block needs travels forward
through the blocks between, as extra entries of the tuple they hand on."""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from ddgpipe.core.values import Value
from ddgpipe.trace.modes import follow_training, rebind_owners, recompile

__all__ = ["TracedBlock", "Wiring", "chain_wiring"]


@dataclass(frozen=True)
class Wiring:
    """Where a block's values come from and go: ``takes[i]`` is the index, in the block's
    input tuple, of the stage's i-th argument; ``keeps`` the inputs handed on unchanged; then
    the stage's outputs ``gives`` (indices into its result) follow them. ``ints`` marks the
    stage arguments that are Python ints (sizes), carried between blocks as 0-d tensors."""

    takes: tuple[int, ...]
    keeps: tuple[int, ...]
    gives: tuple[int, ...]
    ints: tuple[bool, ...]
    tuple_result: bool


class TracedBlock(nn.Module):
    """One block of a traced model: torch's stage module, holding the user's parameters,
    called on the entries of the input tuple it needs, handing on what later blocks need.

    ``train()``/``eval()`` also set the flags of the user's modules its dropout reads, so the
    block and the user's model switch together (see :mod:`ddgpipe.trace.modes`)."""

    def __init__(self, stage: nn.Module, wiring: Wiring, model: nn.Module):
        super().__init__()
        self.stage = stage
        self.wiring = wiring
        owners, random = follow_training(stage, model)
        self._owners = tuple(owners)  # not submodules: their parameters belong elsewhere
        self.draws_random_numbers = random  # read by the engine's random streams
        self._device: torch.device | None = None  # where the graph makes its tensors

    def forward(self, *inputs: Tensor) -> Value:
        w = self.wiring
        if inputs and inputs[0].device != self._device:
            # torch.export wrote the tracing device into the tensors the graph makes
            # (arange, masks, x.to(device)): make them where this block's input now is
            follow_device(self.stage, inputs[0].device)
            self._device = inputs[0].device
        args = [int(inputs[i].item()) if is_int else inputs[i]
                for i, is_int in zip(w.takes, w.ints)]
        result = self.stage(*args)
        made = [result[i] for i in w.gives] if w.tuple_result else [result]
        out = tuple([inputs[i] for i in w.keeps] + [_as_tensor(v) for v in made])
        return out if len(out) > 1 else out[0]

    def __deepcopy__(self, memo: dict[int, Any]) -> TracedBlock:
        """A copy whose dropout follows the copies of its owners (copied along with it)."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        rebind_owners(clone.stage, {id(o): memo[id(o)] for o in self._owners if id(o) in memo})
        return clone

    def train(self, mode: bool = True) -> TracedBlock:
        super().train(mode)
        for owner in self._owners:
            owner.training = mode
        return self


def follow_device(stage: nn.Module, device: torch.device) -> None:
    """Point every device argument in ``stage``'s graphs (``arange(..., device=)``,
    ``x.to(device)``) at ``device``."""
    found: list[Any] = []

    def moved(value: Any) -> Any:
        if isinstance(value, torch.device) and value != device:
            found.append(value)
            return device
        return value

    for sub in stage.modules():
        graph = getattr(sub, "graph", None)
        if not isinstance(graph, fx.Graph):
            continue
        found.clear()
        for node in graph.nodes:
            before = len(found)
            args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), moved)
            if len(found) > before:
                node.args, node.kwargs = args, kwargs
        if found:
            recompile(sub)


def _as_tensor(value: Any) -> Tensor:
    """A stage's output as a tensor: sizes (ints) travel as 0-d int64 tensors."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (bool, int, float)):
        return torch.tensor(value)
    raise TypeError(f"a traced stage handed on a {type(value).__name__}, not a tensor or a "
                    "number")


def chain_wiring(split: fx.GraphModule,
                 outputs: Sequence[int] | None = None) -> tuple[list[str], list[Wiring]]:
    """The stage modules' names in order and each one's :class:`Wiring`, from the top graph
    of torch's split module (placeholders, ``call_module`` stages, ``getitem``s, output);
    the last block returns the model's flattened outputs ``outputs`` (None: all)."""
    graph = split.graph
    calls = [n for n in graph.nodes if n.op == "call_module"]
    output = next(n for n in graph.nodes if n.op == "output")
    finals = _output_nodes(output)
    if outputs is not None:
        finals = [finals[i] for i in outputs]
    live = [n for n in graph.nodes if n.op == "placeholder" and n.users]
    wirings = []
    for k, call in enumerate(calls):
        later = {a for c in calls[k + 1:] for a in c.args if isinstance(a, fx.Node)}
        needed = later | (set(finals) if k + 1 < len(calls) else set())
        takes = tuple(live.index(a) for a in call.args)
        ints = tuple(_is_int_placeholder(split.get_submodule(call.target), i)
                     for i in range(len(call.args)))
        produced, tuple_result = _produced(call)
        if k + 1 == len(calls):
            keeps: tuple[int, ...] = tuple(live.index(n) for n in finals if n in live)
            gives = tuple(i for n in finals for i, m in produced if m is n)
        else:
            keeps = tuple(i for i, n in enumerate(live) if n in needed)
            gives = tuple(i for i, n in produced if n in needed)
        wirings.append(Wiring(takes, keeps, gives, ints, tuple_result))
        live = [live[i] for i in keeps] + [n for i, n in produced if i in gives]
    return [str(c.target) for c in calls], wirings


def _produced(call: fx.Node) -> tuple[list[tuple[int, fx.Node]], bool]:
    """The values a stage call gives the top graph: ``(index in its result, node)``."""
    users = list(call.users)
    if users and all(u.op == "call_function" and u.target is operator.getitem for u in users):
        return sorted(((int(u.args[1]), u) for u in users), key=lambda p: p[0]), True  # type: ignore[arg-type]
    return [(0, call)], False


def _output_nodes(output: fx.Node) -> list[fx.Node]:
    """The top graph's returned values, flattened."""
    found: list[fx.Node] = []
    fx.node.map_arg(output.args, found.append)
    return found


def _is_int_placeholder(stage: nn.Module, index: int) -> bool:
    """Whether the stage's ``index``-th argument was traced as an integer (a size)."""
    holders = [n for n in stage.graph.nodes if n.op == "placeholder"]  # type: ignore[union-attr]
    value = holders[index].meta.get("val")
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)
