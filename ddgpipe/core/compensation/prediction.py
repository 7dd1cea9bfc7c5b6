"""``lwp``: linear weight prediction (Kosson et al., MLSys 2021): a delayed stage's forward
runs at ``w - lr D v``, where momentum SGD takes the weights by the time its gradient lands.

Why and how: ``docs/compensation.md``, "Linear weight prediction".
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
                             "momentum's velocity (wp predicts for Adam, AdamW and NAdam)")

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
                predicted[name] = p - v * (groups[id(p)]["lr"] * self.stale_steps)
        return predicted
