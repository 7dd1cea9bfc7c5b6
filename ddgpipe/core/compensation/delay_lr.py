"""``delay-lr``: delay-adaptive step size (Mishchenko et al., NeurIPS 2022): stage k's lr
times ``min(1, c / d_k)``, so staler gradients take smaller steps.

Why and how: ``docs/compensation.md``, "Delay-adaptive step size".
"""

from __future__ import annotations

from ddgpipe.core.compensation.base import Rule

__all__ = ["DelayAdaptiveLR", "delay_lr_factor"]


def delay_lr_factor(delay: int, c: float) -> float:
    """``min(1, c / delay)``; 1 without delay."""
    return 1.0 if delay == 0 else min(1.0, c / delay)


class DelayAdaptiveLR(Rule):
    """Stage k's lr times ``min(1, c / d_k)``."""

    name = "delay-lr"
    phase = "lr"

    def __init__(self, delay_lr_c: float = 1.0):
        self.c = delay_lr_c

    def lr_factor(self) -> float:
        return delay_lr_factor(self.stale_steps, self.c)
