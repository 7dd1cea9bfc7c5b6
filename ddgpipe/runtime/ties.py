"""How the executors carry a tie's gradients between its copies (the rule:
:mod:`ddgpipe.core.ties`): a rendezvous per clock in one process (the reference never waits
in it; the stage threads meet there), point-to-point messages between ranks (gloo).

In one process the later uses get copies of the user's Parameter (the first use keeps it),
so no stage thread reads a tensor another one writes; a checkpoint holds the tie once, in its
owner's state, which the owner publishes to the copies when it is restored.
"""

from __future__ import annotations

import copy
import io
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ddgpipe.core.schedule import Schedule
from ddgpipe.core.streams import Handoff, receive, send
from ddgpipe.core.ties import TieGroup, TieWaitStopped, find_ties
from ddgpipe.errors import PeerError, StageError, UsageError

__all__ = ["SharedTies", "RankTies", "tie_groups", "copy_tied"]

_POLL_S = 0.05
_RESTORE_TAG = 1 << 20  # above the clocks' tags (two per tie)


def tie_groups(modules: Sequence[nn.Module], schedule: Schedule,
               replicas: int = 1) -> list[TieGroup]:
    """The ties of a pipeline cut into ``modules``, refused where ``schedule`` or the
    placement has no rule for them."""
    groups = find_ties(modules)
    if groups and not schedule.sums_tied_gradients:
        raise UsageError(f"tied parameter {groups[0]}: {schedule.name} has no rule for a "
                         "parameter used by two stages (DDG sums the uses' gradients); untie "
                         "it (give each use its own nn.Parameter) or use DDG")
    if groups and replicas > 1:
        raise UsageError(f"tied parameter {groups[0]}: replicas do not exchange tied "
                         "gradients yet; drop --replicas or untie the parameter")
    return groups


def _set_parameter(module: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    module.get_submodule(owner)._parameters[attr] = value


def copy_tied(modules: Sequence[nn.Module],
              groups: Sequence[TieGroup]) -> dict[int, nn.Parameter]:
    """Give every later use of each tie a copy of its Parameter (the first use keeps the
    user's), so that stages in one process never share a tensor; a module object held by two
    stages cannot be given two parameters, and is refused. Returns the user's Parameter of
    each tie, by tie index."""
    originals = {}
    for group in groups:
        k0 = group.owner
        original = modules[k0].get_parameter(group.names_in(k0)[0])
        originals[group.index] = original
        held = {k0: original}
        for k, names in group.uses[1:]:
            held[k] = nn.Parameter(original.detach().clone(),
                                   requires_grad=original.requires_grad)
            for name in names:
                _set_parameter(modules[k], name, held[k])
        if any(modules[k].get_parameter(n) is not held[k] for k, names in group.uses
               for n in names):
            raise UsageError(
                f"tied parameter {group}: one module object is used by stages "
                f"{', '.join(map(str, group.stages))}, so their copies cannot be kept apart; "
                "give each stage its own module and tie only the Parameter "
                "(head.weight = emb.weight)")
    return originals


class SharedTies:
    """The tied copies of stages in one process meet here once per clock: each offers its
    gradient (or None), and each collects all of them once all have offered."""

    def __init__(self, originals: dict[int, nn.Parameter], timeout_s: float = 300.0):
        self.originals = originals  # the user's Parameter of each tie (copy_tied's)
        self.timeout_s = timeout_s
        self._changed = threading.Condition()
        self._offered: dict[tuple[int, int], dict[int, Handoff | None]] = {}
        self._collected: dict[tuple[int, int], int] = {}
        self._stopped: Callable[[], bool] = lambda: False
        self._published: dict[int, dict] = {}
        self._fetched: dict[int, int] = {}

    def interrupt_when(self, stopped: Callable[[], bool]) -> None:
        self._stopped = stopped

    def factory_parameter(self, group: TieGroup, copy: nn.Parameter) -> nn.Parameter:
        return self.originals[group.index]

    def publish(self, group: TieGroup, payload: dict) -> None:
        self._published[group.index] = payload

    def fetch(self, group: TieGroup, stage: int) -> dict:
        if group.index not in self._published:
            raise RuntimeError(f"stage {stage}: tied parameter {group} restored before its "
                               f"owner, stage {group.owner}")
        payload = copy.deepcopy(self._published[group.index])  # no tensor shared by copies
        self._fetched[group.index] = self._fetched.get(group.index, 0) + 1
        if self._fetched[group.index] == len(group.stages) - 1:  # every copy has it
            del self._published[group.index], self._fetched[group.index]
        return payload

    def offer(self, group: TieGroup, stage: int, seq: int, grad: Tensor | None) -> None:
        with self._changed:
            self._offered.setdefault((group.index, seq), {})[stage] = \
                None if grad is None else send(grad)
            self._changed.notify_all()

    def collect(self, group: TieGroup, stage: int, seq: int,
                like: Tensor) -> list[Tensor | None]:
        key = (group.index, seq)
        deadline = time.monotonic() + self.timeout_s
        with self._changed:
            while len(self._offered.get(key, ())) < len(group.stages):
                if self._stopped():
                    raise TieWaitStopped
                if time.monotonic() > deadline:
                    late = [k for k in group.stages if k not in self._offered.get(key, {})]
                    raise StageError(stage, f"waited {self.timeout_s:.0f} s for the gradients "
                                     f"of tied parameter {group} from stage {late[0]}")
                self._changed.wait(_POLL_S)
            offered = self._offered[key]
            self._collected[key] = self._collected.get(key, 0) + 1
            if self._collected[key] == len(group.stages):  # every copy has its sum
                del self._offered[key], self._collected[key]
        return [None if (handoff := offered[k]) is None else
                _as_tensor(receive(handoff, like.device)) for k in group.stages]


def _as_tensor(value: object) -> Tensor:
    assert isinstance(value, Tensor), "a tie's gradient is one tensor"
    return value


class RankTies:
    """The tied copies of stages on different ranks: at each clock a copy sends its gradient
    (a flag, then the tensor if there is one) to every other copy and receives theirs, over a
    gloo group of its own, through host memory."""

    def __init__(self, rank_of: Callable[[int], int], timeout_s: float = 300.0):
        # a collective call: every rank makes it, as every rank finds the same ties
        self.group = dist.new_group(backend="gloo")
        self.rank_of = rank_of
        self.timeout = timedelta(seconds=timeout_s)
        self._mine: dict[int, Tensor | None] = {}
        self._sends: list[tuple[object, Tensor]] = []

    def interrupt_when(self, stopped: Callable[[], bool]) -> None:
        """A rank's waits end by the timeout (its peers' failures reach it as errors)."""

    def factory_parameter(self, group: TieGroup, copy: nn.Parameter) -> nn.Parameter:
        """Each rank holds the user's Parameter itself."""
        return copy

    def publish(self, group: TieGroup, payload: dict) -> None:
        """Send the owner's restored tie to every other copy: its length, then its bytes."""
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        works = [dist.isend(t, self.rank_of(k), group=self.group, tag=_RESTORE_TAG + i)
                 for k in group.stages[1:] for i, t in enumerate((size, data))]
        for work in works:
            self._wait(work, group, None)

    def fetch(self, group: TieGroup, stage: int) -> dict:
        owner = self.rank_of(group.owner)
        size = torch.zeros(1, dtype=torch.int64)
        self._wait(dist.irecv(size, owner, group=self.group, tag=_RESTORE_TAG), group,
                   group.owner)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        self._wait(dist.irecv(data, owner, group=self.group, tag=_RESTORE_TAG + 1), group,
                   group.owner)
        return torch.load(io.BytesIO(data.numpy().tobytes()), map_location="cpu",
                          weights_only=True)

    def offer(self, group: TieGroup, stage: int, seq: int, grad: Tensor | None) -> None:
        self._mine[group.index] = grad
        wire = None if grad is None else grad.detach().to("cpu").contiguous()
        flag = torch.tensor([wire is not None], dtype=torch.int64)
        for other in group.stages:
            if other == stage:
                continue
            for tensor, tag in [(flag, 2 * group.index), (wire, 2 * group.index + 1)]:
                if tensor is not None:
                    work = dist.isend(tensor, self.rank_of(other), group=self.group, tag=tag)
                    self._sends.append((work, tensor))

    def collect(self, group: TieGroup, stage: int, seq: int,
                like: Tensor) -> list[Tensor | None]:
        got: list[Tensor | None] = []
        for other in group.stages:
            if other == stage:
                got.append(self._mine.pop(group.index))
                continue
            flag = torch.zeros(1, dtype=torch.int64)
            self._wait(dist.irecv(flag, self.rank_of(other), group=self.group,
                                  tag=2 * group.index), group, other)
            if not flag.item():
                got.append(None)
                continue
            grad = torch.empty(like.shape, dtype=like.dtype)
            self._wait(dist.irecv(grad, self.rank_of(other), group=self.group,
                                  tag=2 * group.index + 1), group, other)
            got.append(grad.to(like.device))
        for work, _ in self._sends:
            self._wait(work, group, None)
        self._sends = []
        return got

    def _wait(self, work, group: TieGroup, peer: int | None) -> None:
        try:
            work.wait(self.timeout)
        except Exception as e:  # gloo raises RuntimeError subclasses with long C++ text
            who = f"from stage {peer}" if peer is not None else "to the other copies"
            raise PeerError(f"exchanging the gradients of tied parameter {group} {who} "
                            f"failed: {str(e).splitlines()[0]}") from e
