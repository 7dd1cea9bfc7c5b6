"""``wp``: optimizer-dependent weight prediction (XPipe, Guan et al. 2019; PipeOptim, Guan et
al. 2023): a delayed stage's forward runs at ``w - lr s u``, u the direction of the optimizer's
own update and s the optimizer steps until the forward's gradient is applied.

Why and how: ``docs/compensation.md``, "Optimizer-dependent weight prediction".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ddgpipe.core.compensation.base import Rule, groups_by_param, require_momentum_sgd
from ddgpipe.errors import UsageError

__all__ = ["OptimizerWeightPrediction", "direction_rule", "nadam_mu"]

#: ``(parameter, its optimizer state, its param group) -> u``, or None before the first step
Direction = Callable[[Tensor, dict, dict], Tensor | None]


def nadam_mu(step: float, beta1: float, momentum_decay: float) -> float:
    """torch's NAdam momentum coefficient at ``step``: ``beta1 (1 - 0.5 * 0.96^(step psi))``."""
    return beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))


def _decoupled(u: Tensor, p: Tensor, group: dict) -> Tensor:
    """The decoupled weight decay's share of the step (AdamW, NAdam(decoupled)): ``wd w``."""
    decay = group["weight_decay"]
    return u.add(p, alpha=decay) if decay != 0 and group.get("decoupled_weight_decay") else u


def sgd_direction(p: Tensor, state: dict, group: dict) -> Tensor | None:
    """Momentum SGD: the velocity (PipeOptim's m_t; Kosson et al.'s ``lwp``)."""
    return state.get("momentum_buffer")


def adam_direction(p: Tensor, state: dict, group: dict) -> Tensor | None:
    """Adam, AdamW: ``m_hat / (sqrt(v_hat) + eps)`` at the current step count, plus ``wd w``
    when the decay is decoupled."""
    step = float(state["step"]) if "step" in state else 0.0
    if step == 0:
        return None
    beta1, beta2 = group["betas"]
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
    u = state["exp_avg"].div(denom).div_(1 - beta1**step)
    return _decoupled(u, p, group)


def nadam_direction(p: Tensor, state: dict, group: dict) -> Tensor | None:
    """NAdam: its step ``lr [(1-mu_t)/(1-P_t) g + mu_{t+1}/(1-P_t mu_{t+1}) m] / denom`` with
    the unknown gradient g estimated by ``m_hat = m / (1 - beta1^t)``, plus ``wd w``."""
    step = float(state["step"]) if "step" in state else 0.0
    if step == 0:
        return None
    beta1, beta2 = group["betas"]
    mu = nadam_mu(step, beta1, group["momentum_decay"])
    mu_next = nadam_mu(step + 1, beta1, group["momentum_decay"])
    product = float(state["mu_product"])
    coefficient = ((1 - mu) / (1 - product) / (1 - beta1**step)
                   + mu_next / (1 - product * mu_next))
    denom = state["exp_avg_sq"].div(1 - beta2**step).sqrt_().add_(group["eps"])
    u = state["exp_avg"].div(denom).mul_(coefficient)
    return _decoupled(u, p, group)


def direction_rule(optimizer: torch.optim.Optimizer) -> Direction:
    """The update direction of ``optimizer``; a :class:`UsageError` for one without a rule."""
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.SGD):
        require_momentum_sgd(optimizer, "wp", "the prediction extrapolates with momentum's "
                             "velocity")
        return sgd_direction
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.NAdam):
        raise UsageError(
            f"compensation wp predicts the weights with the update direction of SGD with "
            f"momentum, Adam, AdamW or NAdam; {name} has no rule here: use --optimizer adamw, "
            "nadam, adam or sgd --momentum 0.9, or a compensation for any optimizer "
            "(dc, delay-lr, accumulate)")
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise UsageError(
                f"compensation wp is derived for {name} without amsgrad and maximize (got "
                f"amsgrad={group.get('amsgrad')}, maximize={group.get('maximize')}): build it "
                "with amsgrad=False, maximize=False, or drop wp")
    return nadam_direction if isinstance(optimizer, torch.optim.NAdam) else adam_direction


class OptimizerWeightPrediction(Rule):
    """The forward of a stage s optimizer steps stale runs at ``w - lr s u`` (u the optimizer's
    update direction), which the stash keeps: the gradient is exact at the prediction."""

    name = "wp"
    phase = "forward"

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        direction_rule(optimizer)

    def bind(self, stage) -> None:
        super().bind(stage)
        self.direction = direction_rule(self.optimizer)
        self.groups = groups_by_param(self.optimizer)

    @torch.no_grad()
    def forward_weights(self) -> dict[str, Tensor]:
        state, steps = self.optimizer.state, self.stale_steps
        predicted = {}
        for name, p in self.params.items():
            group = self.groups[id(p)]
            u = self.direction(p, state[p], group) if p in state else None
            predicted[name] = p.detach().clone() if u is None else p - u * (group["lr"] * steps)
        return predicted
