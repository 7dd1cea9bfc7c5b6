"""``accumulate``: bounded staleness (PipeDream-2BW, PACI): a delayed stage steps once every A
gradients with their mean, so a gradient is at most ``ceil(d_k / A)`` steps stale.

Why and how: ``docs/compensation.md``, "Accumulation: bounded staleness".
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddgpipe.core.compensation.base import Rule

__all__ = ["Accumulate"]


class Accumulate(Rule):
    """Sum the delayed gradients; every ``accumulate_steps`` of them, step with their mean."""

    name = "accumulate"
    phase = "update"

    def __init__(self, accumulate_steps: int = 4):
        self.every = accumulate_steps
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.lrs: list[float] = []  # the (scaled) lr of each group at the last gradient

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            if p.grad is None:
                continue
            total = self.sums.get(name)
            if total is None:
                self.sums[name] = p.grad.detach().clone()
            else:
                total.add_(p.grad)
        self.count += 1
        self.lrs = [group["lr"] for group in self.optimizer.param_groups]
        if self.count == self.every:
            self._apply()

    def _apply(self) -> None:
        """Step with the mean of the sums, then start again."""
        for name, p in self.params.items():
            total = self.sums.pop(name, None)
            p.grad = None if total is None else total.div_(self.count)
        self.optimizer.step()
        self.count = 0

    @torch.no_grad()
    def finish(self) -> bool:
        if self.count == 0:
            return False
        groups = self.optimizer.param_groups
        saved = [group["lr"] for group in groups]
        for group, lr in zip(groups, self.lrs, strict=True):
            group["lr"] = lr
        try:
            self._apply()
        finally:
            for group, lr in zip(groups, saved):
                group["lr"] = lr
        return True

    def state_dict(self) -> dict:
        return {"sums": {n: t.clone() for n, t in self.sums.items()}, "count": self.count,
                "lrs": list(self.lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {n: t.clone() for n, t in state.get("sums", {}).items()}
        self.count = int(state.get("count", 0))
        self.lrs = [float(lr) for lr in state.get("lrs", [])]
