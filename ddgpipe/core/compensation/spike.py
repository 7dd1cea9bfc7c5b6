"""``sc``: Spike Compensation (Kosson, Chiley, Venigalla, Hestness, Köster, "Pipelined
Backpropagation at Scale: Training Large Models without Batches", MLSys 2021, arXiv
2003.11666, the section of that name).

With momentum SGD (``v <- m v + g``, ``w <- w - lr v``) a gradient applied at step s moves
the weights by ``lr m^j g`` at step s+j. A gradient that is D steps late has missed the
moves ``m^0 .. m^(D-1)`` it would have made, and its later moves are ``m^D`` times too large
compared with an on-time gradient that far along. Spike compensation applies it as

    v <- m v + g
    w <- w - lr (a v + b g),    a = m^D,   b = (1 - m^D) / (1 - m)

so the late gradient's moves from step s on are ``(a + b), a m, a m^2, ...`` = exactly the
on-time gradient's ``sum_{j<=D} m^j, m^(D+1), m^(D+2), ...``: the missed part is paid at once
(the spike), the rest is the on-time trajectory, and the total is still ``1 / (1 - m)``. For
D = 1 this is Nesterov momentum in PyTorch's form (``w <- w - lr (g + m v)``), which is why
``sc`` refuses ``nesterov=True``. D = 0 (the last stage) is plain momentum SGD; the stage
does not consult its compensation there.

Here D is the stage's delay d_k and g is what ``torch.optim.SGD`` would use: the delayed
gradient (already exact at the forward's weights, by weight stashing) plus ``weight_decay``
times the *live* weights. The momentum buffer is the optimizer's own
(``optimizer.state[p]["momentum_buffer"]``), so checkpoints save it as before.
Only SGD with momentum: the coefficients come from momentum's geometric impulse response,
which Adam's normalised update does not have.
"""

from __future__ import annotations

import torch

from ddgpipe.core.compensation.base import Rule, require_momentum_sgd

__all__ = ["SpikeCompensation", "spike_coefficients"]


def spike_coefficients(momentum: float, delay: int) -> tuple[float, float]:
    """``(a, b)`` of ``w <- w - lr (a v + b g)`` for momentum m and delay D."""
    a = momentum**delay
    return a, (1.0 - a) / (1.0 - momentum)


class SpikeCompensation(Rule):
    """Kosson et al.'s spike compensation: the update phase of momentum SGD, for delay d_k."""

    name = "sc"
    phase = "update"

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        require_momentum_sgd(optimizer, self.name, "spike compensation reshapes momentum's "
                             "impulse response", nesterov_ok=False)

    @torch.no_grad()
    def update(self) -> None:
        optimizer = self.optimizer
        for group in optimizer.param_groups:
            a, b = spike_coefficients(group["momentum"], self.delay)
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if decay == 0 else p.grad.add(p, alpha=decay)
                state = optimizer.state[p]
                v = state.get("momentum_buffer")
                if v is None:  # as SGD's first step: v = g
                    v = state["momentum_buffer"] = g.clone()
                else:
                    v.mul_(group["momentum"]).add_(g)
                p.add_(v * a + g * b, alpha=-lr)
