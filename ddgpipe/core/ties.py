"""Tied parameters across stages: one parameter used by stages i < j (a tied embedding and
output projection) is held by both, and both copies take the same update at every clock.

The rule (``docs/design.md``, "Tied weights across stages"): at clock t every copy steps with
the sum, in stage order, of the gradients its uses learned at t (stage j's of minibatch
t - d_j, stage i's of t - d_i, each at the weights its own forward used), through an
optimizer and LR schedule of the tie's own in each stage, built by the same factories, so the
copies stay bitwise equal. A clock where no use learned leaves the copies alone. How the
gradients travel between the copies is the executor's (:class:`TieExchange`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ddgpipe.errors import UsageError

__all__ = ["TieGroup", "TieExchange", "TieWaitStopped", "StageTies", "find_ties",
           "refuse_shared_buffers", "check_even", "sum_in_stage_order"]


@dataclass(frozen=True)
class TieGroup:
    """Parameter number ``index`` among a pipeline's ties: ``uses`` gives, in stage order,
    each stage holding it and the names it has there (a stage may hold it more than once)."""

    index: int
    uses: tuple[tuple[int, tuple[str, ...]], ...]

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(stage for stage, _ in self.uses)

    @property
    def owner(self) -> int:
        """The first stage holding it: it keeps the user's Parameter and checkpoints it."""
        return self.uses[0][0]

    def names_in(self, stage: int) -> tuple[str, ...]:
        return dict(self.uses)[stage]

    def __str__(self) -> str:
        return " = ".join(f"stage {k} {names[0]!r}" for k, names in self.uses)


def _shared(stages: Sequence[nn.Module], kind: str) -> list[tuple[Tensor, list[tuple[int, str]]]]:
    """Tensors of ``kind`` (parameters or buffers) held by more than one stage, with every
    (stage, name) holding them, in the order their first use appears."""
    uses: dict[int, tuple[Tensor, list[tuple[int, str]]]] = {}
    for k, module in enumerate(stages):
        named = module.named_parameters(remove_duplicate=False) if kind == "parameter" \
            else module.named_buffers(remove_duplicate=False)
        for name, tensor in named:
            uses.setdefault(id(tensor), (tensor, []))[1].append((k, name))
    return [(t, found) for t, found in uses.values() if len({k for k, _ in found}) > 1]


def refuse_shared_buffers(stages: Sequence[nn.Module], cuts: Sequence[int] = ()) -> None:
    """A buffer in two stages has no tie rule (a forward updates it at its own clock, e.g.
    BatchNorm's statistics): refused, naming both uses and the fixes."""
    for _, found in _shared(stages, "buffer"):
        (i, first), (j, other) = found[0], next(u for u in found if u[0] != found[0][0])
        where = f" (cut at {','.join(map(str, cuts))})" if cuts else ""
        raise UsageError(
            f"buffer {first!r} of stage {i} is also {other!r} of stage {j}{where}: a buffer "
            "shared by two stages has no tie rule (only trainable parameters are tied, their "
            "copies stepping with the sum of both uses' gradients); give each use its own "
            "buffer, or cut the model so that both uses are in one stage")


def find_ties(stages: Sequence[nn.Module]) -> list[TieGroup]:
    """The trainable parameters several of ``stages`` hold (the stages' modules, in order):
    where every stage learns which of its parameters are tied. A frozen parameter shared by
    stages never changes and needs no tie; a shared buffer is refused."""
    refuse_shared_buffers(stages)
    groups: list[TieGroup] = []
    for tensor, found in _shared(stages, "parameter"):
        if not tensor.requires_grad:
            continue
        by_stage: dict[int, list[str]] = {}
        for k, name in found:
            by_stage.setdefault(k, []).append(name)
        groups.append(TieGroup(len(groups), tuple((k, tuple(n)) for k, n in by_stage.items())))
    return groups


def sum_in_stage_order(grads: Sequence[Tensor | None]) -> Tensor | None:
    """The tie's gradient of a clock: its uses' gradients added in stage order (None where
    no use learned), the same expression in every copy so that all get the same bits."""
    total: Tensor | None = None
    for grad in grads:
        if grad is not None:
            total = grad.clone() if total is None else total + grad
    return total


class TieExchange(Protocol):
    """How a stage's copy of a tie gets the other copies' gradients of a clock (set by the
    executor: a rendezvous in one process, point-to-point messages between ranks)."""

    def offer(self, group: TieGroup, stage: int, seq: int, grad: Tensor | None) -> None:
        """Hand ``stage``'s gradient of exchange ``seq`` (None: it learned nothing) to the
        other copies; returns at once."""
        ...

    def collect(self, group: TieGroup, stage: int, seq: int,
                like: Tensor) -> list[Tensor | None]:
        """Every use's gradient of exchange ``seq``, in stage order, on the device of
        ``like`` (the stage's copy)."""
        ...

    def interrupt_when(self, stopped: Callable[[], bool]) -> None:
        """Give up a wait, raising :class:`TieWaitStopped`, once ``stopped()`` holds."""
        ...

    def factory_parameter(self, group: TieGroup, copy: nn.Parameter) -> nn.Parameter:
        """The Parameter the optimizer factory is given for ``copy``: the user's own, so
        that every copy's optimizer is built alike."""
        ...

    def publish(self, group: TieGroup, payload: dict) -> None:
        """The owner's restored copy and its optimizer and LR state, for the other copies
        (a checkpoint holds them once); called in stage order, the owner first."""
        ...

    def fetch(self, group: TieGroup, stage: int) -> dict:
        """What the owner of ``group`` published, for ``stage``'s copy (its own objects)."""
        ...


class TieWaitStopped(Exception):
    """Raised in a stage waiting for a tied copy's gradients when its executor stops."""


OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class StageTies:
    """A stage's copies of its tied parameters, each with an optimizer and LR schedule of its
    own, built by the stage's factories: identical in every copy by construction.

    At the stage's step (S) :meth:`take` moves the copies' gradients aside (the stage's own
    optimizer and clipping never see them); at the end of every clock :meth:`offer` and
    :meth:`settle` exchange them and step each copy with the sum, clipped on its own.
    """

    def __init__(self, stage: int, groups: Sequence[TieGroup], params: dict[str, nn.Parameter],
                 optimizer: OptimizerFactory, lr_scheduler: SchedulerFactory | None,
                 clip_grad: float | None, exchange: TieExchange):
        self.stage = stage
        self.groups = [g for g in groups if stage in g.stages]
        self.names = [next(n for n in g.names_in(stage) if n in params) for g in self.groups]
        self.params = [params[n] for n in self.names]
        self.optimizers = [_built_for(optimizer, exchange.factory_parameter(g, p), p)
                           for g, p in zip(self.groups, self.params, strict=True)]
        self.lr_schedulers = [lr_scheduler(o) for o in self.optimizers] if lr_scheduler else []
        self.clip_grad = clip_grad
        self.exchange = exchange
        self.seq = 0  # exchanges so far: the same count in every copy, clock after clock
        self._taken: list[Tensor | None] = [None] * len(self.groups)

    def take(self) -> None:
        """At S: keep the copies' gradients of this step for the clock's exchange."""
        for i, p in enumerate(self.params):
            self._taken[i], p.grad = p.grad, None

    def offer(self) -> None:
        """At the end of a clock's actions: hand this clock's gradients to the other copies."""
        for group, grad in zip(self.groups, self._taken, strict=True):
            self.exchange.offer(group, self.stage, self.seq, grad)
        self._taken = [None] * len(self.groups)

    def settle(self) -> None:
        """Before the LR advances: step each copy with the sum of its uses' gradients."""
        for group, p, opt in zip(self.groups, self.params, self.optimizers, strict=True):
            grad = sum_in_stage_order(self.exchange.collect(group, self.stage, self.seq, p))
            if grad is None:
                continue
            p.grad = grad
            if self.clip_grad is not None:  # the tie clipped as a group of its own
                torch.nn.utils.clip_grad_norm_([p], self.clip_grad)
            opt.step()
            p.grad = None
        self.seq += 1

    def advance_lr(self) -> None:
        """Where the stage's own schedule advances: every clock, or at a step's last clock
        under microbatches (the same clocks in every stage, so the copies' rates agree)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            for scheduler in self.lr_schedulers:
                scheduler.step()

    def copied_names(self) -> set[str]:
        """The names of the copies this stage holds for an earlier stage (the owner), which
        its checkpoint leaves out."""
        return {n for g in self.groups if g.owner != self.stage for n in g.names_in(self.stage)}

    def owned_state(self) -> dict:
        """The optimizer and LR states of the ties this stage owns, by tie index: a
        checkpoint holds each tie once, in its owner's state."""
        return {g.index: {"optimizer": o.state_dict(),
                          "lr_scheduler": s.state_dict() if s is not None else None}
                for g, o, s in zip(self.groups, self.optimizers, self._schedulers(), strict=True)
                if g.owner == self.stage}

    def restore(self, owned: dict) -> None:
        """After the stage's weights are loaded: an owner restores its ties from ``owned``
        and publishes them; every other copy takes the owner's weights and states."""
        for g, p, o, s in zip(self.groups, self.params, self.optimizers, self._schedulers(),
                              strict=True):
            if g.owner == self.stage:
                saved = owned.get(g.index)
                if saved is not None:
                    _load(o, s, saved)
                self.exchange.publish(g, {"weight": p.detach().clone(),
                                          "optimizer": o.state_dict(),
                                          "lr_scheduler": s.state_dict() if s else None})
                continue
            got = self.exchange.fetch(g, self.stage)
            with torch.no_grad():
                p.copy_(got["weight"])
            _load(o, s, got)

    def _schedulers(self) -> list:
        return self.lr_schedulers or [None] * len(self.optimizers)


def _built_for(factory: OptimizerFactory, seen: nn.Parameter,
               copy: nn.Parameter) -> torch.optim.Optimizer:
    """The optimizer ``factory`` makes for the user's Parameter ``seen``, stepping ``copy``:
    a factory that tells parameters apart by identity (Muon's exclusions) treats every copy
    as it treats the user's."""
    optimizer = factory([seen])
    if seen is not copy:
        for group in optimizer.param_groups:
            group["params"] = [copy if q is seen else q for q in group["params"]]
    return optimizer


def _load(optimizer: torch.optim.Optimizer, scheduler: Any, saved: dict) -> None:
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None and saved["lr_scheduler"] is not None:
        scheduler.load_state_dict(saved["lr_scheduler"])


def check_even(group: TieGroup, compensation: str, grad_scale: float, delay: int,
               precision: str) -> None:
    """Refuse, naming it, a stage setting that would give the copies of ``group`` different
    updates: a compensation (they depend on the stage's delay), FDG's shrinking, fp16."""
    uneven = [what for what, holds in [
        (f"compensation {compensation} (it depends on the stage's delay)",
         compensation != "none"),
        (f"grad_shrink (beta ** {delay} here)", grad_scale != 1.0),
        ("fp16 (each minibatch's gradient carries its own loss scale)", precision == "fp16"),
    ] if holds]
    if uneven:
        raise UsageError(
            f"tied parameter {group} (one parameter in stages "
            f"{', '.join(map(str, group.stages))}): its copies must take the same update at "
            f"every clock, which {uneven[0]} would break; drop it, or untie the parameter "
            "(give each use its own nn.Parameter)")
