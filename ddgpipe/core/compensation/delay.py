"""``dc`` and ``dc-c``: delay-compensated gradients (Zheng, Meng, Wang, Chen, Yu, Ma, Liu,
"Asynchronous Stochastic Gradient Descent with Delay Compensation", ICML 2017, arXiv
1609.08326: DC-ASGD).

A delayed gradient g = grad f(w_bak) was computed at the backup weights w_bak but is
applied to w, which has moved on. DC-ASGD corrects it with the first-order Taylor term of
the gradient, approximating the Hessian by the diagonal of the gradient's outer product,
scaled by lambda:

    g_dc = g + lambda * g ⊙ g ⊙ (w - w_bak)

* ``dc-c`` (the paper's DC-ASGD-c): a constant lambda, default 0.04 (MXNet's ``DCASGD``
  default, and the CIFAR-10 value reported for DC-ASGD-c);
* ``dc`` (DC-ASGD-a, the adaptive variant, which the paper reports as the better one): per
  coordinate,

      MeanSquare <- beta * MeanSquare + (1 - beta) * g ⊙ g
      lambda_t   = lambda_0 / sqrt(MeanSquare + eps)

  with lambda_0 = 2 and beta = 0.95 by default (the CIFAR-10 values reported for
  DC-ASGD-a) and eps = 1e-7; the update order (MeanSquare first, then lambda_t) and eps are
  those of the authors' public implementation (Microsoft's Multiverso DC-ASGD updaters).

In DDG, w_bak is the weights the minibatch's forward used, which weight stashing keeps (and
which ``lwp`` may have predicted), and w is the live weights at the step; so the correction
needs stash ``graph`` or ``recompute``. Under stash ``none`` the replay computes the
gradient at the live weights themselves: w - w_bak = 0 and there is nothing to compensate.

The correction is applied to the loss gradient, before the optimizer adds weight decay
(which PyTorch computes at the live weights, hence already undelayed) and before it makes
the step: SGD, momentum SGD and Adam all consume the corrected gradient, as DC-ASGD's server
consumes it in place of g. With ``grad_shrink`` the shrunk gradient is the one corrected.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddgpipe.core.compensation.base import Rule

__all__ = ["DelayCompensation", "DC_EPS"]

DC_EPS = 1e-7


class DelayCompensation(Rule):
    """DC-ASGD's gradient correction; ``adaptive`` selects DC-ASGD-a over DC-ASGD-c."""

    phase = "gradient"

    def __init__(self, adaptive: bool, dc_lambda: float, dc_decay: float = 0.95):
        self.name = "dc" if adaptive else "dc-c"
        self.adaptive = adaptive
        self.lam = dc_lambda
        self.decay = dc_decay
        self.mean_square: dict[str, Tensor] = {}

    @torch.no_grad()
    def correct_gradient(self, forward_weights: dict[str, Tensor] | None) -> None:
        if forward_weights is None:
            raise RuntimeError("dc needs the forward's weights; stash mode none keeps none")
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            g2 = g * g
            lam: Tensor | float
            if self.adaptive:
                ms = self.mean_square.get(name)
                if ms is None:
                    ms = self.mean_square[name] = torch.zeros_like(g)
                ms.mul_(self.decay).add_(g2, alpha=1.0 - self.decay)
                lam = self.lam / torch.sqrt(ms + DC_EPS)
            else:
                lam = self.lam
            p.grad = g + lam * g2 * (p.detach() - forward_weights[name].detach())

    def state_dict(self) -> dict:
        return {"mean_square": {n: t.clone() for n, t in self.mean_square.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.mean_square = {n: t.clone() for n, t in state.get("mean_square", {}).items()}

