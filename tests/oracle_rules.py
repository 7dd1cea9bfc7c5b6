"""The staleness rules, each as :class:`tests.oracles.DDGOracle` with one step overridden, written
out from its paper independently of ddgpipe. Compose them with
:func:`tests.oracles.oracle_with`; ``RULES`` maps ddgpipe's compensation names to them.
stage-momentum is not here: it only chooses each stage's optimizer coefficients.
"""

from __future__ import annotations

import numpy as np

from tests.oracles import DDGOracle, Weights


class SpikeCompensation(DDGOracle):
    """sc (Kosson et al. 2021): a delayed stage's SGD steps w -= lr (m^d b + (1 - m^d)/(1 - m) g'),
    b the momentum buffer, g' the decayed gradient (``NpSGD.spike``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for optimizer, delay in zip(self.optimizers, self.delays):
            optimizer.spike = delay


class LinearWeightPrediction(DDGOracle):
    """lwp (Kosson et al. 2021): a delayed stage's forward uses w - lr d b, b its momentum
    buffer, once it has one."""

    def forward_weights(self, k: int, t: int) -> Weights:
        d, buffer = self.delays[k], self.optimizers[k].b
        if d > 0 and buffer is not None:
            return [a - self.lr(k, t) * d * b for a, b in zip(self.w[k], buffer)]
        return super().forward_weights(k, t)


class DCASGD(DDGOracle):
    """dc (Zheng et al., DC-ASGD-a): on a delayed stage g <- g + lam g*g*(w - w_fwd), with
    s = 0.95 s + 0.05 g*g and lam = 2 / sqrt(s + 1e-7)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mean_square: list[Weights | None] = [None] * self.stages

    def correct(self, k: int, g: Weights, stashed: Weights) -> Weights:
        g = super().correct(k, g, stashed)
        if self.delays[k] == 0:
            return g
        lam = self.lambdas(k, g)
        return [gi + li * gi * gi * (wi - ui) for gi, li, wi, ui in zip(g, lam, self.w[k], stashed)]

    def lambdas(self, k: int, g: Weights) -> list:
        previous = self.mean_square[k] or [np.zeros_like(a) for a in g]
        self.mean_square[k] = [0.95 * ms + 0.05 * gi * gi for ms, gi in zip(previous, g)]
        return [2.0 / np.sqrt(ms + 1e-7) for ms in self.mean_square[k]]


class DCASGDConstant(DCASGD):
    """dc-c (Zheng et al., DC-ASGD-c): the same correction with lam = 0.04."""

    def lambdas(self, k: int, g: Weights) -> list:
        return [0.04] * len(g)


class PipeMareLR(DDGOracle):
    """pipemare-lr (Yang et al., T1): a delayed stage's lr times d^-max(0, 1 - t / anneal),
    anneal = ``options["pipemare_anneal"]``."""

    def lr(self, k: int, t: int) -> float:
        lr, d = super().lr(k, t), self.delays[k]
        anneal = self.options["pipemare_anneal"]
        return lr * d ** -max(0.0, 1.0 - t / anneal) if d > 0 else lr


class PipeMare(PipeMareLR):
    """pipemare (Yang et al., T1 and T2): with stash none the delayed backward replays at
    w - d delta, delta = 0.9 delta + 0.1 (w_new - w_old) after each update."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delta: list[Weights | None] = [None] * self.stages

    def backward_weights(self, k: int, stashed: Weights) -> Weights:
        d, delta = self.delays[k], self.delta[k]
        if self.stash == "none" and d > 0 and delta is not None:
            return [a - d * da for a, da in zip(self.w[k], delta)]
        return super().backward_weights(k, stashed)

    def update(self, k: int, g: Weights, lr: float) -> None:
        old = [a.copy() for a in self.w[k]]
        super().update(k, g, lr)
        if self.delays[k] > 0:
            delta = self.delta[k] or [np.zeros_like(a) for a in self.w[k]]
            self.delta[k] = [0.9 * da + 0.1 * (wn - wo)
                             for da, wn, wo in zip(delta, self.w[k], old)]


class DelayLR(DDGOracle):
    """delay-lr (Mishchenko et al. 2022): a delayed stage's lr times min(1, c / d),
    c = ``options["delay_lr_c"]`` (1 by default)."""

    def lr(self, k: int, t: int) -> float:
        lr, d = super().lr(k, t), self.delays[k]
        return lr * min(1.0, self.options.get("delay_lr_c", 1.0) / d) if d > 0 else lr


class Accumulate(DDGOracle):
    """accumulate (PipeDream-2BW, PACI): a delayed stage sums its gradients and steps every
    A = ``options["accumulate_steps"]`` of them with their mean, at that clock's lr; the
    leftover at the end of the drain with its mean and the lr of its last gradient's clock."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sums: list[Weights | None] = [None] * self.stages
        self.count, self.last_lr = [0] * self.stages, [0.0] * self.stages

    def update(self, k: int, g: Weights, lr: float) -> None:
        if self.delays[k] == 0:
            return super().update(k, g, lr)
        total = self.sums[k]
        self.sums[k] = g if total is None else [a + b for a, b in zip(total, g)]
        self.count[k], self.last_lr[k] = self.count[k] + 1, lr
        steps = self.options["accumulate_steps"]
        if self.count[k] == steps:
            super().update(k, [a / steps for a in self.sums[k]], lr)
            self.sums[k], self.count[k] = None, 0

    def finish(self) -> None:
        super().finish()
        for k, (total, count) in enumerate(zip(self.sums, self.count)):
            if count:
                super().update(k, [a / count for a in total], self.last_lr[k])


RULES: dict[str, type[DDGOracle]] = {
    "sc": SpikeCompensation, "lwp": LinearWeightPrediction, "dc": DCASGD,
    "dc-c": DCASGDConstant, "pipemare-lr": PipeMareLR, "pipemare": PipeMare,
    "delay-lr": DelayLR, "accumulate": Accumulate,
}
