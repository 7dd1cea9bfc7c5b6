"""The hook a stage consults at F, B and S (and once at the end), and the phases of a step
that let several papers' rules share it; the identity compensation is plain DDG.

Why and how: ``docs/compensation.md``, "The hook and its phases".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor, nn

from ddgpipe.errors import UsageError

__all__ = ["Compensation", "Rule", "Rules", "PHASES", "StageView", "optimizer_of",
           "require_momentum_sgd",
           "groups_by_param", "scaled_lr"]

Weights = dict[str, Tensor]


class StageView(Protocol):
    """What a compensation sees of its stage (:class:`ddgpipe.core.stage.Stage` is one)."""

    delay: int
    num_stages: int
    steps: int
    optimizer: torch.optim.Optimizer | None

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """The stage's trainable parameters by name."""
        ...


def optimizer_of(stage: StageView) -> torch.optim.Optimizer:
    """The stage's optimizer; a stage without parameters has none and steps nothing."""
    if stage.optimizer is None:
        raise RuntimeError("a stage without trainable parameters has no optimizer to step")
    return stage.optimizer


class Compensation:
    """Plain DDG: forward with the live weights, step with the optimizer as given."""

    name = "none"

    def bind(self, stage: StageView) -> None:
        """Called once when the stage is built: check the optimizer, keep what is needed."""
        self.stage = stage

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return optimizer_of(self.stage)

    def forward_weights(self) -> Weights | None:
        """The weights the next forward uses, by parameter name; None means the live ones."""
        return None

    def replay_weights(self) -> Weights | None:
        """Stash mode ``none`` only: the weights the replay of the minibatch whose backward
        runs now uses, by parameter name (fresh tensors); None means the live ones."""
        return None

    def step(self, forward_weights: Weights | None) -> None:
        """Apply the delayed gradient in ``p.grad`` to the live parameters.

        ``forward_weights`` are the weights the gradient's minibatch ran its forward with (the
        stash's version; None when the stash keeps none, i.e. stash mode ``none``).
        """
        self.optimizer.step()

    def finish(self) -> None:
        """At the end of training: apply what the compensation still holds back."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


#: the phases of a step a rule may change, in the order :class:`Rules` runs them
PHASES = ("optimizer", "forward", "replay", "gradient", "lr", "update")


class Rule:
    """One paper's rule: it changes the phase ``phase`` of a stage's step and no other.

    Subclasses override the method of their phase; the defaults are the identity.
    """

    name = ""
    phase = ""
    #: whether :meth:`after_update` wants the weights as they were before the update
    wants_before = False

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise :class:`UsageError` when the rule is undefined for this optimizer."""

    def bind(self, stage: StageView) -> None:
        self.stage = stage

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return optimizer_of(self.stage)

    @property
    def delay(self) -> int:
        return self.stage.delay

    @property
    def stale_steps(self) -> int:
        """Optimizer steps between a forward and the step that applies its gradient: the one
        place a rule reads staleness in steps from: d_k while every clock is a step,
        ceil(d_k / M) under M microbatches per step."""
        return int(getattr(self.stage, "stale_steps", self.stage.delay))

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        return self.stage.params

    def lr_scales(self) -> list[float] | None:  # phase "optimizer"
        """A constant factor of each param group's lr (in order), set with the coefficients
        the rule changed when it was bound; None: all 1."""
        return None

    def forward_weights(self) -> Weights | None:  # phase "forward"
        return None

    def replay_weights(self) -> Weights | None:  # phase "replay"
        return None

    def correct_gradient(self, forward_weights: Weights | None) -> None:  # phase "gradient"
        pass

    def lr_factor(self) -> float:  # phase "lr"
        return 1.0

    def update(self) -> None:  # phase "update"
        self.optimizer.step()

    def after_update(self, before: Weights) -> None:
        """Called with the live weights as they were before the update, when ``wants_before``."""

    def finish(self) -> bool:
        """At the end of training: apply what the rule holds back; True if it updated the
        weights (then the rules that watch updates see it)."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Rules(Compensation):
    """Several rules, at most one per phase, run as one compensation.

    Binding runs the optimizer rule first (it changes the optimizer's coefficients, which
    the others then see). A step runs: the gradient rule (corrects ``p.grad``), then the
    update rule (or ``optimizer.step()``) with every learning rate scaled by the lr rule's
    factor (times the optimizer rule's constant per-group scale), then ``after_update`` of
    the rules that asked for the weights before the update.
    """

    def __init__(self, rules: list[Rule]):
        by_phase: dict[str, Rule] = {}
        for rule in rules:
            if rule.phase in by_phase:
                raise UsageError(
                    f"compensations {by_phase[rule.phase].name} and {rule.name} both change "
                    f"the {rule.phase} phase of a step; choose one of them"
                )
            by_phase[rule.phase] = rule
        self.rules = rules
        self.by_phase = by_phase
        self.name = ",".join(r.name for r in rules) or "none"

    def bind(self, stage: StageView) -> None:
        super().bind(stage)
        for rule in self.rules:
            rule.check(optimizer_of(stage))
        for rule in sorted(self.rules, key=lambda r: PHASES.index(r.phase)):
            rule.bind(stage)

    def forward_weights(self) -> Weights | None:
        rule = self.by_phase.get("forward")
        if rule is None:
            return None
        with scaled_lr(self.optimizer, self._lr_factor()):  # predict with the step's lr
            return rule.forward_weights()

    def _lr_factor(self) -> float | list[float]:
        factor = self.by_phase["lr"].lr_factor() if "lr" in self.by_phase else 1.0
        scales = self.by_phase["optimizer"].lr_scales() if "optimizer" in self.by_phase \
            else None
        return factor if scales is None else [factor * s for s in scales]

    def replay_weights(self) -> Weights | None:
        rule = self.by_phase.get("replay")
        return rule.replay_weights() if rule else None

    def step(self, forward_weights: Weights | None) -> None:
        if "gradient" in self.by_phase:
            self.by_phase["gradient"].correct_gradient(forward_weights)
        watchers = [r for r in self.rules if r.wants_before]
        before = {n: p.detach().clone() for n, p in self.stage.params.items()} \
            if watchers else {}
        with scaled_lr(self.optimizer, self._lr_factor()):
            if "update" in self.by_phase:
                self.by_phase["update"].update()
            else:
                self.optimizer.step()
        for rule in watchers:
            rule.after_update(before)

    def finish(self) -> None:
        watchers = [r for r in self.rules if r.wants_before]
        before = {n: p.detach().clone() for n, p in self.stage.params.items()} \
            if watchers else {}
        updated = False
        for rule in self.rules:
            updated |= rule.finish()
        if updated:
            for rule in watchers:
                rule.after_update(before)

    def state_dict(self) -> dict:
        return {rule.name: rule.state_dict() for rule in self.rules}

    def load_state_dict(self, state: dict) -> None:
        for rule in self.rules:
            rule.load_state_dict(state.get(rule.name, {}))


@contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer,
              factor: float | Sequence[float]) -> Iterator[None]:
    """Every group's lr times ``factor`` (one for all, or one per group in order) for the
    block; restored exactly after it."""
    groups = optimizer.param_groups
    factors = [factor] * len(groups) if isinstance(factor, float | int) else list(factor)
    if len(factors) != len(groups):
        raise RuntimeError(f"{len(factors)} lr factors for {len(groups)} param groups")
    if all(f == 1.0 for f in factors):
        yield
        return
    saved = [group["lr"] for group in groups]
    for group, f in zip(groups, factors):
        group["lr"] = group["lr"] * f
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr


def require_momentum_sgd(optimizer: torch.optim.Optimizer, rule: str, why: str,
                        nesterov_ok: bool = True) -> None:
    """Refuse anything but SGD with momentum > 0 (no dampening, not maximising)."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise UsageError(
            f"compensation {rule} needs SGD with momentum, got {type(optimizer).__name__}: "
            f"{why}; use --optimizer sgd --momentum 0.9, or a compensation that applies to "
            f"any optimizer (dc, dc-c, pipemare-lr, pipemare)"
        )
    for group in optimizer.param_groups:
        if not group["momentum"] > 0:
            raise UsageError(
                f"compensation {rule} needs SGD with momentum > 0 (got momentum "
                f"{group['momentum']}): {why}; pass --momentum 0.9, or drop {rule}"
            )
        if group.get("dampening", 0) != 0 or group.get("maximize", False):
            raise UsageError(
                f"compensation {rule} is derived for v <- m v + g, w <- w - lr v; this SGD has "
                f"dampening {group.get('dampening')} / maximize {group.get('maximize')}: "
                "build it with dampening=0 and maximize=False"
            )
        if group.get("nesterov", False) and not nesterov_ok:
            raise UsageError(
                f"compensation {rule} replaces the momentum update, and Nesterov momentum is "
                f"already its D = 1 case: drop --nesterov (nesterov=False), or drop {rule}"
            )


def groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """``id(param) -> its param group``."""
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}
