"""``accumulate``: bounded staleness by accumulation (Narayanan, Phanishayee, Shi, Chen,
Zaharia, "Memory-Efficient Pipeline-Parallel DNN Training", ICML 2021, arXiv 2006.09503:
PipeDream-2BW; Elam, Rahimi, Mendelson, Baskin, "Breaking the Bubble: Asynchronous Pipeline
Parallel Training with Bounded Weight Inconsistency", arXiv 2606.07881: PACI).

A delayed stage does not step at every gradient: it sums A of them and steps once with
their mean,

    w <- OptStep(w, (1/A) sum_{j=1..A} g_j)        once every A delayed gradients,

g_j being what the step would otherwise apply (after the stage's clipping, FDG's shrinking
and a gradient rule like ``dc``). Between two steps the weights do not move, so a gradient
is at most ceil(d_k / A) optimizer steps stale instead of d_k. Neither paper's text could be
reached; the rule is read from their public code: PACI (ItayElam/PACI, ``DistPACI/
Workers.py``) accumulates a backwards per stage and calls ``optimizer.step()`` every a-th
one (loss divided by a: the mean); PipeDream-2BW (msr-fiddle/pipedream, branch
``pipedream_2bw``) averages m >= K microbatches per update. ddgpipe keeps DDG's weight
stashing, so each g_j is exact at its forward's weights (PACI's code has no stashing, and
2BW uses one shared delay for all stages): this is the per-stage accumulation of those
schedules, not either one exactly. Only delayed stages accumulate; the last stage steps at
every clock. A (``accumulate_steps``) is an integer >= 2, default 4 (PACI's default a is 8).

The step happens at the clock of the A-th gradient, with that clock's lr (the schedule
advances every clock), scaled by an ``lr`` rule when there is one. At the end of training
(:meth:`finish`, called at the end of the drain) the leftover gradients, fewer than A, are
applied with their mean and the lr of the clock the last of them arrived in, so every
minibatch is learned from exactly once. The sums, their count and that lr are the rule's
state (checkpoints). A gradient skipped for an fp16 overflow is not counted. ``sc`` also
replaces the update and cannot be combined with it.
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
