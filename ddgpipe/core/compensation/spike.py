"""``sc``: spike compensation (Kosson et al., MLSys 2021): momentum SGD pays a D-steps-late
gradient's missed momentum at once, then follows the on-time gradient's trajectory.

Why and how: ``docs/compensation.md``, "Spike compensation".
"""

from __future__ import annotations

import torch

from ddgpipe.core.compensation.base import Rule, require_momentum_sgd

__all__ = ["SpikeCompensation", "spike_coefficients"]


def spike_coefficients(momentum: float, delay: int) -> tuple[float, float]:
    """``(a, b)`` of ``w <- w - lr (a v + b g)`` for momentum m and delay D."""
    a = momentum**delay
    return a, (1.0 - a) / (1.0 - momentum)


class SpikeCompensation(Rule):
    """Kosson et al.'s spike compensation: the update phase of momentum SGD, for delay d_k."""

    name = "sc"
    phase = "update"

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        require_momentum_sgd(optimizer, self.name, "spike compensation reshapes momentum's "
                             "impulse response", nesterov_ok=False)

    @torch.no_grad()
    def update(self) -> None:
        optimizer = self.optimizer
        for group in optimizer.param_groups:
            a, b = spike_coefficients(group["momentum"], self.stale_steps)
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if decay == 0 else p.grad.add(p, alpha=decay)
                state = optimizer.state[p]
                v = state.get("momentum_buffer")
                if v is None:  # as SGD's first step: v = g
                    v = state["momentum_buffer"] = g.clone()
                else:
                    v.mul_(group["momentum"]).add_(g)
                p.add_(v * a + g * b, alpha=-lr)
