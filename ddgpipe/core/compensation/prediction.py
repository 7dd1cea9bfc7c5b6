"""``lwp``: Linear Weight Prediction (Kosson, Chiley, Venigalla, Hestness, Köster, "Pipelined
Backpropagation at Scale: Training Large Models without Batches", MLSys 2021, arXiv
2003.11666, the section of that name), in its velocity form.

The gradient of the minibatch a stage forwards at clock t is applied D = d_k optimizer
steps later, to the weights of clock t + D. Instead of running that forward with today's
weights, run it with a linear extrapolation of where momentum SGD is taking them:

    w_hat = w - lr * D * v

(``v`` the momentum buffer, ``lr`` the current learning rate), so the gradient is computed
near the weights it will update. With weight stashing the stash keeps ``w_hat``: the
backward is exact at ``w_hat`` (the DDG update with the forward's weights replaced by the
prediction) and the update is applied to the live weights ``w``. Under stash mode ``none``
the forward uses ``w_hat`` and the replay the live weights of clock t + D, which the
prediction approximates: that is the paper's own setting (no weight stashing), where
prediction brings the forward's and the backward's weights together.

Combined with ``sc`` (the paper's best setting, ``sc,lwp``) the prediction is unchanged:
with spike compensation a steady gradient g still moves the weights by ``lr g / (1 - m) =
lr v`` per step, so ``lr D v`` remains the linear extrapolation. With ``pipemare-lr`` the
prediction uses the rescaled learning rate of the clock.

Before a stage's first step there is no velocity and the prediction is the live weights.
Only SGD with momentum (Nesterov allowed: its steady step is also ``lr v``); the velocity of
Adam is not its step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddgpipe.core.compensation.base import Rule, groups_by_param, require_momentum_sgd

__all__ = ["LinearWeightPrediction"]


class LinearWeightPrediction(Rule):
    """The forward of a stage with delay D runs at ``w - lr D v``, which the stash keeps."""

    name = "lwp"
    phase = "forward"

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        require_momentum_sgd(optimizer, self.name, "the prediction extrapolates with "
                             "momentum's velocity")

    def bind(self, stage) -> None:
        super().bind(stage)
        self.groups = groups_by_param(self.optimizer)

    @torch.no_grad()
    def forward_weights(self) -> dict[str, Tensor]:
        optimizer, groups = self.optimizer, self.groups
        predicted = {}
        for name, p in self.params.items():
            v = optimizer.state[p].get("momentum_buffer") if p in optimizer.state else None
            if v is None:
                predicted[name] = p.detach().clone()
            else:
                predicted[name] = p - v * (groups[id(p)]["lr"] * self.delay)
        return predicted
