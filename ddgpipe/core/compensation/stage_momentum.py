"""``stage-momentum``: stage-dependent momentum (Ajanthan et al., ICML 2025, AsyncPP): the more
delayed a stage, the larger its first-moment coefficient, set once when the stage is built.

Why and how: ``docs/compensation.md``, "Stage-dependent momentum".
"""

from __future__ import annotations

import torch

from ddgpipe.core.compensation.base import Rule, require_momentum_sgd
from ddgpipe.errors import UsageError

__all__ = ["StageMomentum", "stage_momentum"]

ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam)


def stage_momentum(base: float, delay: int, num_stages: int, top: float) -> float:
    """AsyncPP's ``b0 + d_k (bmax - b0) / K``."""
    return base + delay * (top - base) / num_stages


def parts_of(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers a composite like MuonAdamW is made of (its ``muon`` and
    ``adamw``), or the optimizer itself."""
    parts = [getattr(optimizer, name, None) for name in ("muon", "adamw")]
    if not isinstance(parts[0], torch.optim.Muon) and \
            not isinstance(parts[1], torch.optim.AdamW):
        return [optimizer]
    inner = [p for p in parts if isinstance(p, torch.optim.Optimizer)]
    owned = {id(g) for p in inner for g in p.param_groups}
    if any(id(g) not in owned for g in optimizer.param_groups):
        raise UsageError(f"compensation stage-momentum cannot tell which optimizer owns each "
                         f"param group of {type(optimizer).__name__}; use --optimizer nadam, "
                         "adamw, muon or sgd --momentum 0.9")
    return inner


class StageMomentum(Rule):
    """Sets stage k's first-moment coefficient to ``b0 + d_k (bmax - b0) / K`` once."""

    name = "stage-momentum"
    phase = "optimizer"

    def __init__(self, stage_momentum_max: float = 0.99):
        self.top = stage_momentum_max
        self.scales: list[float] | None = None

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        for part in parts_of(optimizer):
            if isinstance(part, torch.optim.SGD):
                require_momentum_sgd(part, self.name, "it sets the momentum per stage")
                bases = [g["momentum"] for g in part.param_groups]
                what = "--momentum"
            elif isinstance(part, ADAM_FAMILY):
                bases = [float(g["betas"][0]) for g in part.param_groups]
                what = "--beta1"
            elif isinstance(part, torch.optim.Muon):
                bases = [g["momentum"] for g in part.param_groups]
                what = "Muon's momentum"
            else:
                raise UsageError(
                    f"compensation stage-momentum sets the first-moment coefficient of SGD "
                    f"with momentum, Adam, AdamW, NAdam or Muon; got {type(part).__name__}: "
                    "use --optimizer nadam (AsyncPP's), adamw, muon or sgd --momentum 0.9")
            for base in bases:
                if base > self.top:
                    raise UsageError(
                        f"compensation stage-momentum raises each delayed stage's momentum "
                        f"from {what} {base} towards stage_momentum_max {self.top}, which is "
                        f"below it: lower {what} or raise --stage-momentum-max")

    def bind(self, stage) -> None:
        super().bind(stage)
        if self.stale_steps == 0:  # the stage without delay keeps b0: its optimizer as built
            return
        by_group = {id(group): self._set(part, group)
                    for part in parts_of(self.optimizer) for group in part.param_groups}
        scales = [by_group[id(group)] for group in self.optimizer.param_groups]
        # Muon and AdamW need no lr scale; skip the scaling when nothing is scaled
        self.scales = scales if any(s != 1.0 for s in scales) else None

    def _set(self, part: torch.optim.Optimizer, group: dict) -> float:
        k_stages = self.stage.num_stages
        if isinstance(part, torch.optim.SGD):
            base = group["momentum"]
            group["momentum"] = stage_momentum(base, self.stale_steps, k_stages, self.top)
            group["nesterov"] = True
            return (1.0 - group["momentum"]) / (1.0 - base)
        if isinstance(part, torch.optim.Muon):
            group["momentum"] = stage_momentum(group["momentum"], self.stale_steps, k_stages,
                                               self.top)
            return 1.0
        beta1, beta2 = group["betas"]
        group["betas"] = (stage_momentum(float(beta1), self.stale_steps, k_stages, self.top), beta2)
        return 1.0

    def lr_scales(self) -> list[float] | None:
        return self.scales
