"""``dc`` and ``dc-c``: DC-ASGD's delay-compensated gradients (Zheng et al., ICML 2017), a
first-order correction of the gradient from the forward's weights to the live ones.

Why and how: ``docs/compensation.md``, "Delay compensation".
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddgpipe.core.compensation.base import Rule

__all__ = ["DelayCompensation", "DC_EPS"]

DC_EPS = 1e-7


class DelayCompensation(Rule):
    """DC-ASGD's gradient correction; ``adaptive`` selects DC-ASGD-a over DC-ASGD-c."""

    phase = "gradient"

    def __init__(self, adaptive: bool, dc_lambda: float, dc_decay: float = 0.95):
        self.name = "dc" if adaptive else "dc-c"
        self.adaptive = adaptive
        self.lam = dc_lambda
        self.decay = dc_decay
        self.mean_square: dict[str, Tensor] = {}

    @torch.no_grad()
    def correct_gradient(self, forward_weights: dict[str, Tensor] | None) -> None:
        if forward_weights is None:
            raise RuntimeError("dc needs the forward's weights; stash mode none keeps none")
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            g2 = g * g
            lam: Tensor | float
            if self.adaptive:
                ms = self.mean_square.get(name)
                if ms is None:
                    ms = self.mean_square[name] = torch.zeros_like(g)
                ms.mul_(self.decay).add_(g2, alpha=1.0 - self.decay)
                lam = self.lam / torch.sqrt(ms + DC_EPS)
            else:
                lam = self.lam
            p.grad = g + lam * g2 * (p.detach() - forward_weights[name].detach())

    def state_dict(self) -> dict:
        return {"mean_square": {n: t.clone() for n, t in self.mean_square.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.mean_square = {n: t.clone() for n, t in state.get("mean_square", {}).items()}

