"""``pipemare-lr`` and ``pipemare``: PipeMare's lr rescheduling (T1) and discrepancy
correction of a stash-``none`` replay's weights (T2) (Yang et al., MLSys 2021).

Why and how: ``docs/compensation.md``, "PipeMare".
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddgpipe.core.compensation.base import Rule

__all__ = ["PipeMareLR", "PipeMareReplay", "pipemare_lr_factor"]


def pipemare_lr_factor(delay: int, clock: int, anneal: int) -> float:
    """T1's factor ``tau^(-p_k)``, ``p_k = max(0, 1 - k/K)``, for delay tau at clock k."""
    power = max(0.0, 1.0 - clock / anneal)
    return float(delay) ** -power


class PipeMareLR(Rule):
    """T1: the stage's lr starts at lr / d_k and reaches lr after ``pipemare_anneal`` clocks."""

    name = "pipemare-lr"
    phase = "lr"

    def __init__(self, pipemare_anneal: int):
        self.anneal = pipemare_anneal

    def lr_factor(self) -> float:
        # S of clock t applies minibatch t - d_k after t - d_k earlier steps: k = steps + d_k
        # (under microbatches d_k in steps, ceil(d_k / M))
        delay = self.stale_steps
        return pipemare_lr_factor(delay, self.stage.steps + delay, self.anneal)


class PipeMareReplay(Rule):
    """T2: a stash-``none`` replay runs at ``w - d_k * delta``, delta an EMA of the updates."""

    name = "pipemare-replay"
    phase = "replay"
    wants_before = True

    def __init__(self, pipemare_ema: float = 0.9):
        self.gamma = pipemare_ema
        self.delta: dict[str, Tensor] = {}

    @torch.no_grad()
    def replay_weights(self) -> dict[str, Tensor]:
        out = {}
        for name, p in self.params.items():
            delta = self.delta.get(name)
            out[name] = p.detach().clone() if delta is None else p - delta * self.stale_steps
        return out

    @torch.no_grad()
    def after_update(self, before: dict[str, Tensor]) -> None:
        for name, p in self.params.items():
            delta = self.delta.get(name)
            if delta is None:
                delta = self.delta[name] = torch.zeros_like(p)
            delta.mul_(self.gamma).add_(p - before[name], alpha=1.0 - self.gamma)

    def state_dict(self) -> dict:
        return {"delta": {n: t.clone() for n, t in self.delta.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.delta = {n: t.clone() for n, t in state.get("delta", {}).items()}
