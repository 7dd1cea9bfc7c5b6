"""``delay-lr``: delay-adaptive step size (Mishchenko, Bach, Even, Woodworth, "Asynchronous
SGD Beats Minibatch SGD Under Arbitrary Delays", NeurIPS 2022, arXiv 2206.07638).

A gradient tau steps stale is applied with a smaller step:

    eta_t = eta * min(1, c / tau_t)

The equation is the one in the authors' public code (konstmish/asynchronous_sgd,
``code.ipynb``, ``run(..., delay_adaptive=True)``: ``lr * M / max(M, tau)``, M the number of
workers); the paper's text could not be reached, so the code is the source, and its
constants (a factor 1/2 or 1/4 in the theory) could not be checked. Koloskova, Stich and
Jaggi (NeurIPS 2022) propose a delay-adaptive rule too; its threshold and constants could
not be checked either (only the abstract was reachable), so it is not implemented.

In DDG the staleness of stage k is constant, tau = d_k = K-1-k, so the rule is a constant
factor of the stage's lr, ``min(1, c / d_k)`` (``delay_lr_c`` c > 0, default 1.0: lr / d_k),
applied on top of the schedule at every step, to any optimizer (decoupled weight decay uses
the scaled lr too, as torch does when a group's lr changes). The stage without delay is never
scaled. With c >= K-1 every factor is 1 and the rule is the identity; the code's c = number
of workers (~ K) would be exactly that, hence the explicit c.
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
        return delay_lr_factor(self.delay, self.c)
