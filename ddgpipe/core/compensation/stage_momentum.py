"""``stage-momentum``: stage-dependent momentum (Ajanthan, Ramasinghe, Zuo, Avraham, Long,
"Nesterov Method for Asynchronous Pipeline Parallel Optimization", ICML 2025, arXiv
2505.01099; the authors' code, PluralisResearch/AsyncPP, option ``--adaptive_momentum``).

A stage with a larger delay gets a larger first-moment coefficient:

    beta1_k = b0 + d_k * (bmax - b0) / K

with b0 the optimizer's own coefficient, d_k = K-1-k the stage's delay, K the number of stages
and bmax = 0.99 (``stage_momentum_max``). The equation is the one in ``main_with_runtime.py``
of AsyncPP (``beta1_base + (num_versions - 1) * (0.99 - beta1_base) / num_stages``, with 0.99
hard-coded there); the paper's own text could not be reached, so the code is the source. It
never reaches bmax (d_k <= K-1 < K), it is b0 at the last stage, and b0 > bmax is refused.

The coefficient is set once, when the stage is built, in the optimizer's param groups, so it
is constant and checkpoints keep it with the optimizer's state_dict:

* Adam, AdamW, NAdam: ``betas[0]`` (AsyncPP's setting: NAdam, the Nesterov look-ahead);
* ``torch.optim.Muon`` (and :class:`ddgpipe.training.optim.MuonAdamW`, recognised by its
  ``muon`` and ``adamw`` parts): Muon's ``momentum`` and AdamW's ``betas[0]``, each from its
  own b0 (0.95 and 0.9 by default). ddgpipe's choice: the paper has no Muon; both are
  moving averages (EMA form), whose step size does not depend on the coefficient;
* momentum SGD (ddgpipe's carry-over, not the paper's): Nesterov momentum with
  m_k = m + d_k (bmax - m) / K, the delayed stage's SGD is switched to ``nesterov=True`` (the
  stage without delay keeps the optimizer as built), and its lr is scaled by
  s_k = (1 - m_k) / (1 - m), so the step a steady gradient makes is kept. Derivation: with
  b <- m b + g a steady g gives b = g / (1 - m), and both heavy-ball (lr b) and Nesterov
  (lr (g + m b)) move lr g / (1 - m) per step; so lr s_k g / (1 - m_k) = lr g / (1 - m).

Plain SGD (momentum 0) has no momentum to change and is refused, as is any other optimizer.
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
        if self.delay == 0:  # the stage without delay keeps b0: its optimizer as built
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
            group["momentum"] = stage_momentum(base, self.delay, k_stages, self.top)
            group["nesterov"] = True
            return (1.0 - group["momentum"]) / (1.0 - base)
        if isinstance(part, torch.optim.Muon):
            group["momentum"] = stage_momentum(group["momentum"], self.delay, k_stages,
                                               self.top)
            return 1.0
        beta1, beta2 = group["betas"]
        group["betas"] = (stage_momentum(float(beta1), self.delay, k_stages, self.top), beta2)
        return 1.0

    def lr_scales(self) -> list[float] | None:
        return self.scales
