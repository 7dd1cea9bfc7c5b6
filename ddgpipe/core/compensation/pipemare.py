"""``pipemare-lr`` and ``pipemare``: PipeMare's two techniques (Yang, Zhang, Li, Ré, Aberger,
De Sa, "PipeMare: Asynchronous Pipeline Parallel DNN Training", MLSys 2021, arXiv
1910.05124).

PipeMare runs a pipeline without weight stashing: the forward of a minibatch sees older
weights than its backward. Its two techniques, in DDG's terms (stage delay tau = d_k, clock
k = the iteration of the update, as the LR schedule counts it):

**T1, learning-rate rescheduling** (``pipemare-lr``). PipeMare's analysis bounds the step
size that keeps a tau-delayed update stable by O(1/tau), so each stage starts at its base lr
divided by its delay and ramps geometrically to the base lr over the first K iterations:

    alpha_(k, stage) = alpha_k * tau^(-p_k),    p_k = max(0, 1 - k / K)

It changes nothing at delay 1 (nor at 0: the last stage never consults its compensation).
It only rescales the learning rate, so it applies to any optimizer and any stash mode.
K (``pipemare_anneal``, in clocks) has no default: PipeMare tunes it per task.

**T2, discrepancy correction** (with T1: ``pipemare``). Without stashing, the backward runs
at weights tau steps newer than the forward's; PipeMare estimates the forward's weights by
stepping back along an exponential moving average delta of the recent updates:

    delta   <- gamma * delta + (1 - gamma) * (w_(t+1) - w_t)      (after every update)
    w_bkwd  =  w - tau * delta

In DDG with stash ``graph`` or ``recompute`` the backward already runs at the forward's
exact weights, so T2 has nothing to correct and is refused. Under stash ``none`` (Features
Replay's mode) the backward replays the forward from the stashed input at the live weights,
tau updates newer than the forward's: T2 makes that replay (and its backward) run at
``w - tau * delta`` instead, an estimate of the forward's weights that costs one weight-sized
buffer per stage instead of a stashed version per in-flight minibatch. gamma
(``pipemare_ema``) defaults to 0.9, ddgpipe's choice, not the paper's. delta is an average of
weight updates, so T2 applies to any optimizer too.
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
        return pipemare_lr_factor(self.delay, self.stage.steps + self.delay, self.anneal)


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
            out[name] = p.detach().clone() if delta is None else p - delta * self.delay
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
