"""The float64 numpy reference the DDG oracle tests compare with: DDG clock by clock on a chain
of tanh layers (one per stage), the optimizers as torch implements them, and each staleness
rule as a subclass that overrides one step of the clock.

A clock of :class:`DDGOracle` (stage k, delay d_k = K-1-k, clock t):

1. every stage's forward of minibatch t at :meth:`~DDGOracle.forward_weights`, kept with
   its input (the stash);
2. the gradients that arrive now (:meth:`~DDGOracle.arrivals`): stage k's backward of
   minibatch t - d_k through :meth:`~DDGOracle.backward_weights`, last stage first, so a
   gradient sent at this clock (d_k = 0 everywhere: backprop) is there for the stage below;
3. each arrival learned from (:meth:`~DDGOracle.learn`): clipped on its own stage,
   corrected (:meth:`~DDGOracle.correct`), applied (:meth:`~DDGOracle.update`) at
   :meth:`~DDGOracle.lr`.

After the drain :meth:`~DDGOracle.finish` runs. Weights are per-stage lists of arrays
(``self.w[k]``), so a rule or schedule that changes which gradients a step sums (microbatches
summed over a step's clocks, a tied parameter's two uses) overrides :meth:`~DDGOracle.clock`
or :meth:`~DDGOracle.learn` and keeps the rest.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ddgpipe

Weights = list[np.ndarray]  # one stage's [W, b]

# --- the network, in torch and by hand ---------------------------------------------------------

#: Widths of the tanh network the compensation oracles train: K stages use the first K + 1.
WIDTHS = (5, 7, 6, 3)


def tanh_net(widths: Sequence[int], seed: int) -> nn.Sequential:
    """Linear + tanh blocks and a last linear layer, float64, one block per stage."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        layers.append(nn.Linear(a, b) if last else nn.Sequential(nn.Linear(a, b), nn.Tanh()))
    return nn.Sequential(*layers).double()


def numpy_params(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every linear layer's (weight, bias), copied to numpy."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [(lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy())
            for lin in linears]


def layer_forward(h: np.ndarray, w: np.ndarray, b: np.ndarray, last: bool) -> np.ndarray:
    z = h @ w.T + b
    return z if last else np.tanh(z)


def layer_backward(h, w, b, last, grad_out) -> tuple[Weights, np.ndarray]:
    """Gradients of <grad_out, layer(h)> w.r.t. W, b and h, at weights (w, b)."""
    z = h @ w.T + b
    dz = grad_out if last else grad_out * (1.0 - np.tanh(z) ** 2)
    return [dz.T @ h, dz.sum(axis=0)], dz @ w


def mse_grad(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d/d out of the mean of squares (torch's ``F.mse_loss``)."""
    return 2.0 * (out - y) / y.size


# --- the case the compensation oracles share ---------------------------------------------------

LR, MOMENTUM, DECAY = 0.1, 0.9, 0.01
ADAM_LR, BETAS, ADAM_WD, EPS = 0.01, (0.9, 0.999), 0.1, 1e-8


def lr_factor(clock: int) -> float:
    """The lr schedule of the compensation oracles (torch: ``LambdaLR(opt, lr_factor)``)."""
    return 1.0 / (1.0 + 0.3 * clock)


#: stage-momentum's top coefficient (AsyncPP's default).
BMAX = 0.99


def momentum_of(base: float, d: int, K: int, top: float = BMAX) -> float:
    """stage-momentum (Ajanthan et al., AsyncPP): beta_k = b0 + d_k (bmax - b0) / K."""
    return base + d * (top - base) / K


def oracle_batches(stages: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seven minibatches of four rows for the K-stage tanh network."""
    widths = WIDTHS[: stages + 1]
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(4, widths[0])), rng.normal(size=(4, widths[-1])))
            for _ in range(7)]


# --- the optimizers as torch implements them ---------------------------------------------------

class NpSGD:
    """torch.optim.SGD: g' = g + wd w; b = m b + g' (b = g' at first); w -= lr (g' + m b)
    with Nesterov, else lr b. ``lr_scale`` multiplies the lr (stage-momentum's); ``spike``
    = d > 0 steps along m^d b + (1 - m^d)/(1 - m) g' instead (sc, Kosson et al.)."""

    def __init__(self, momentum=MOMENTUM, nesterov=False, lr_scale=1.0, decay=DECAY):
        self.m, self.nesterov, self.scale, self.decay = momentum, nesterov, lr_scale, decay
        self.b: Weights | None = None
        self.spike = 0

    def step(self, w: Weights, g: Weights, lr: float) -> Weights:
        lr = lr * self.scale
        g = [gi + self.decay * wi for gi, wi in zip(g, w)]
        self.b = [gi.copy() for gi in g] if self.b is None else \
            [self.m * bi + gi for bi, gi in zip(self.b, g)]
        return [wi - lr * ui for wi, ui in zip(w, self.direction(g, self.b))]

    def direction(self, g: Weights, b: Weights) -> Weights:
        """What the lr multiplies, from the decayed gradient and the new momentum buffer."""
        if self.spike:
            a, c = self.m**self.spike, (1 - self.m**self.spike) / (1 - self.m)
            return [a * bi + c * gi for bi, gi in zip(b, g)]
        return [gi + self.m * bi for gi, bi in zip(g, b)] if self.nesterov else b


def plain_sgd(k: int, delay: int) -> NpSGD:
    """w -= lr g: no momentum, no weight decay (the paper's update)."""
    return NpSGD(momentum=0.0, decay=0.0)


def decayed(w: Weights, rate: float) -> Weights:
    """Decoupled weight decay on the matrices only (nanoGPT's groups, ``decay_groups``)."""
    return [wi * (1 - rate) if wi.ndim >= 2 else wi for wi in w]


class NpAdamW:
    """torch.optim.AdamW, weight decay on the matrix only (decay_groups)."""

    def __init__(self, beta1=BETAS[0], beta2=BETAS[1], wd=ADAM_WD):
        self.b1, self.b2, self.wd, self.t = beta1, beta2, wd, 0
        self.m: Weights | None = None
        self.v: Weights | None = None

    def step(self, w: Weights, g: Weights, lr: float) -> Weights:
        self.t += 1
        if self.m is None or self.v is None:
            self.m, self.v = [np.zeros_like(a) for a in g], [np.zeros_like(a) for a in g]
        w = decayed(w, lr * self.wd)
        self.m = [self.b1 * m + (1 - self.b1) * gi for m, gi in zip(self.m, g)]
        self.v = [self.b2 * v + (1 - self.b2) * gi * gi for v, gi in zip(self.v, g)]
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        return [wi - lr / c1 * m / (np.sqrt(v) / math.sqrt(c2) + EPS)
                for wi, m, v in zip(w, self.m, self.v)]


class NpNAdam:
    """torch.optim.NAdam(decoupled_weight_decay=True), decay on the matrix only:
    mu_t = b1 (1 - 0.5 * 0.96^(t psi)), P_t = prod mu_i, m = b1 m + (1-b1) g,
    v = b2 v + (1-b2) g^2, denom = sqrt(v / (1 - b2^t)) + eps,
    w = w (1 - lr wd) - lr (1 - mu_t)/(1 - P_t) g/denom - lr mu_{t+1}/(1 - P_t mu_{t+1}) m/denom."""

    def __init__(self, beta1=BETAS[0], beta2=BETAS[1], wd=ADAM_WD, psi=0.004):
        self.b1, self.b2, self.wd, self.psi, self.t, self.prod = beta1, beta2, wd, psi, 0, 1.0
        self.m: Weights | None = None
        self.v: Weights | None = None

    def step(self, w: Weights, g: Weights, lr: float) -> Weights:
        self.t += 1
        if self.m is None or self.v is None:
            self.m, self.v = [np.zeros_like(a) for a in g], [np.zeros_like(a) for a in g]
        w = decayed(w, lr * self.wd)
        mu = self.b1 * (1 - 0.5 * 0.96 ** (self.t * self.psi))
        mu_next = self.b1 * (1 - 0.5 * 0.96 ** ((self.t + 1) * self.psi))
        self.prod *= mu
        self.m = [self.b1 * m + (1 - self.b1) * gi for m, gi in zip(self.m, g)]
        self.v = [self.b2 * v + (1 - self.b2) * gi * gi for v, gi in zip(self.v, g)]
        out = []
        for wi, gi, m, v in zip(w, g, self.m, self.v):
            denom = np.sqrt(v / (1 - self.b2**self.t)) + EPS
            out.append(wi - lr * (1 - mu) / (1 - self.prod) * gi / denom
                       - lr * mu_next / (1 - self.prod * mu_next) * m / denom)
        return out


# --- DDG, clock by clock -----------------------------------------------------------------------

@dataclass
class Arrival:
    """A gradient that reaches stage ``stage`` now: of ``minibatch``, taken at the weights the
    stage's forward of it used (``forward_weights``)."""

    stage: int
    minibatch: int
    grad: Weights
    forward_weights: Weights


class DDGOracle:
    """DDG on a tanh chain, one layer per stage, in float64:

        w_k^{t+1} = w_k^t - lr_t g_k^t,  g_k^t = grad_k loss(x_{t-d_k}; the weights each stage's
        forward of x_{t-d_k} used),

    with stage k's optimizer ``optimizer(k, d_k)`` (an Np* object) instead of plain SGD, its lr
    ``lr * schedule(t)``, per-stage clipping at ``clip`` (g min(1, clip / (||g|| + 1e-6))) and,
    ``stash="none"``, the delayed backward at the live weights. ``delays`` overrides d_k (all
    zero: backprop); ``options`` are the rules' settings, by ddgpipe's option names."""

    def __init__(self, params, batches, optimizer: Callable[[int, int], object] = plain_sgd, *,
                 lr: float = LR, schedule: Callable[[int], float] = lambda t: 1.0,
                 stash: str = "graph", clip: float | None = None,
                 delays: Sequence[int] | None = None, options: dict | None = None):
        self.batches, self.base_lr, self.schedule = batches, lr, schedule
        self.stash, self.clip, self.options = stash, clip, dict(options or {})
        K = len(params)
        self.delays = list(delays) if delays is not None else [K - 1 - k for k in range(K)]
        self.w: list[Weights] = [[a.copy() for a in p] for p in params]
        self.optimizers = [optimizer(k, d) for k, d in enumerate(self.delays)]
        self.kept: dict[tuple[int, int], tuple[np.ndarray, Weights]] = {}
        self.sent: dict[tuple[int, int], np.ndarray] = {}  # input gradients, to stage k - 1
        self.clipped = 0  # how many gradients the clip shrank

    @property
    def stages(self) -> int:
        return len(self.w)

    def run(self) -> list[Weights]:
        """Every clock, the drain included, then :meth:`finish`; the final weights."""
        for t in range(len(self.batches) + max(self.delays)):
            self.clock(t)
        self.finish()
        return self.w

    def clock(self, t: int) -> None:
        if t < len(self.batches):
            self.forward(t)
        for arrival in self.arrivals(t):
            self.learn(arrival, t)

    def forward(self, t: int) -> None:
        h = self.batches[t][0]
        for k in range(self.stages):
            u = self.forward_weights(k, t)
            self.kept[(k, t)] = (h, u)
            h = layer_forward(h, *u, last=k == self.stages - 1)

    def arrivals(self, t: int) -> list[Arrival]:
        """The backward of minibatch t - d_k on every stage that has one, last stage first."""
        out = []
        for k in reversed(range(self.stages)):
            s = t - self.delays[k]
            if 0 <= s < len(self.batches):
                out.append(self.backward(k, s))
        return out[::-1]

    def backward(self, k: int, s: int) -> Arrival:
        h, u = self.kept.pop((k, s))
        last = k == self.stages - 1
        grad_out = mse_grad(layer_forward(h, *u, last=True), self.batches[s][1]) if last \
            else self.sent.pop((k, s))
        g, grad_in = layer_backward(h, *self.backward_weights(k, u), last=last,
                                    grad_out=grad_out)
        if k > 0:
            self.sent[(k - 1, s)] = grad_in
        return Arrival(k, s, g, u)

    def learn(self, arrival: Arrival, t: int) -> None:
        g = self.clipped_grad(arrival.grad)
        g = self.correct(arrival.stage, g, arrival.forward_weights)
        self.update(arrival.stage, g, self.lr(arrival.stage, t))

    def clipped_grad(self, g: Weights) -> Weights:
        if self.clip is None:
            return g
        coef = self.clip / (math.sqrt(sum(float((gi * gi).sum()) for gi in g)) + 1e-6)
        self.clipped += coef < 1
        return [gi * min(1.0, coef) for gi in g]

    # --- the hooks a rule overrides ---

    def lr(self, k: int, t: int) -> float:
        """Stage k's lr at clock t."""
        return self.base_lr * self.schedule(t)

    def forward_weights(self, k: int, t: int) -> Weights:
        """The weights stage k's forward of minibatch t uses (and the stash keeps)."""
        return [a.copy() for a in self.w[k]]

    def backward_weights(self, k: int, stashed: Weights) -> Weights:
        """The weights the delayed backward goes through: the stashed ones, or the live ones
        when nothing is stashed."""
        return self.w[k] if self.stash == "none" and self.delays[k] > 0 else stashed

    def correct(self, k: int, g: Weights, stashed: Weights) -> Weights:
        """The gradient phase: the gradient the optimizer gets."""
        return g

    def update(self, k: int, g: Weights, lr: float) -> None:
        """The optimizer phase: one step of stage k."""
        self.w[k] = self.optimizers[k].step(self.w[k], g, lr)

    def finish(self) -> None:
        """The end of the drain."""


class MicrobatchedOracle(DDGOracle):
    """Microbatched DDG: each minibatch is fed as ``microbatches`` M microbatches of B / M rows,
    one per clock (``self.batches`` holds the microbatches); every stage sums the gradients
    that reach it during a step's M clocks and, at the last of them (clock sM + M - 1), steps
    once with their mean at lr_s; the drain ends with a step on what is left."""

    def __init__(self, params, batches, optimizer: Callable[[int, int], object] = plain_sgd, *,
                 microbatches: int, **settings):
        rows = len(batches[0][0]) // microbatches
        micro = [(x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows])
                 for x, y in batches for i in range(microbatches)]
        super().__init__(params, micro, optimizer, **settings)
        self.microbatches = microbatches
        self.summed: dict[int, tuple[Weights, int]] = {}  # stage -> (sum, count)

    def clock(self, t: int) -> None:
        if t < len(self.batches):
            self.forward(t)
        for arrival in self.arrivals(t):
            k, g = arrival.stage, arrival.grad
            total, count = self.summed.pop(k, (None, 0))
            total = g if total is None else [a + b for a, b in zip(total, g)]
            if (t + 1) % self.microbatches and arrival.minibatch < len(self.batches) - 1:
                self.summed[k] = (total, count + 1)
                continue
            mean = [a / (count + 1) for a in total]
            self.learn(Arrival(k, arrival.minibatch, mean, arrival.forward_weights),
                       t // self.microbatches)


def oracle_with(*rules: type[DDGOracle]) -> type[DDGOracle]:
    """DDG with the given rules, composed in order (each calls ``super()`` for the rest)."""
    if not rules:
        return DDGOracle
    return type("+".join(r.__name__ for r in rules), (*rules, DDGOracle), {})


def compensated_ddg(params, batches, optimizer, rules: Sequence[type[DDGOracle]] = (), *,
                    lr: float = LR, **settings) -> list[Weights]:
    """The compensation oracles' run: DDG with ``rules`` at lr * lr_factor(t)."""
    oracle = oracle_with(*rules)(params, batches, optimizer, lr=lr, schedule=lr_factor,
                                 **settings)
    return oracle.run()


# --- the torch side of the same case -----------------------------------------------------------

@contextlib.contextmanager
def float64_default():
    """torch keeps NAdam's mu_product (and the steps) in float32 unless the default dtype is
    float64 when the state is made, at the first step: run the whole pipeline so."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def torch_sgd(nesterov=False):
    return lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM, weight_decay=DECAY,
                                      nesterov=nesterov)


def torch_ddg(stages, batches, optimizer, compensation=None, options=None, stash="graph",
              clip=None, executor=None, float64=True, microbatches=1):
    """ddgpipe's DDG on the tanh network with the oracles' lr schedule: the start and final
    weights as :func:`numpy_params` gives them."""
    model = tanh_net(WIDTHS[: stages + 1], seed=3)
    start = numpy_params(model)
    with float64_default() if float64 else contextlib.nullcontext():
        pipe = ddgpipe.DDG(
            model, stages, optimizer, stash=stash, clip_grad=clip, compensation=compensation,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor),
            compensation_options=options, executor=executor, microbatches=microbatches)
        for x, y in batches:
            pipe.step(torch.from_numpy(x), torch.from_numpy(y), F.mse_loss)
        pipe.drain()
    return start, numpy_params(model)


# --- a parameter tied across stages ------------------------------------------------------------

class TiedOracle(DDGOracle):
    """DDG with the matrices of stages ``tie`` tied (every layer square): each of those
    stages holds a copy; at clock t the copies step, through an optimizer of their own
    (``tie_optimizer()``, one object: the copies are equal), with the sum in stage order of
    the matrix gradients its uses learn at t, clipped as a group of their own; the rest of a
    tied stage (its bias) learns as usual, clipped without the matrix. Composed with
    :class:`MicrobatchedOracle` (``tied_microbatched``) "learn" is a step: the sum is then
    of the stepping uses' means, at the step's lr."""

    def __init__(self, params, batches, optimizer=plain_sgd, *, tie: Sequence[int],
                 tie_optimizer: Callable[[], object], **settings):
        super().__init__(params, batches, optimizer, **settings)
        self.tie, self.tie_opt = tuple(tie), tie_optimizer()
        self._tied: list[np.ndarray] = []  # the matrix gradients learned this clock
        self._tie_t = 0

    def clock(self, t: int) -> None:
        self._tied = []
        super().clock(t)
        if self._tied:
            total = self._tied[0]
            for g in self._tied[1:]:
                total = total + g
            (shared,) = self.tie_opt.step([self.w[self.tie[0]][0]], self.clipped_grad([total]),
                                          self.lr(self.tie[0], self._tie_t))
            for k in self.tie:
                self.w[k][0] = shared.copy()

    def learn(self, arrival: Arrival, t: int) -> None:
        k = arrival.stage
        if k not in self.tie:
            super().learn(arrival, t)
            return
        self._tied.append(arrival.grad[0])
        self._tie_t = t
        rest = self.clipped_grad(arrival.grad[1:])
        self.w[k][1:] = self.optimizers[k].step(self.w[k][1:], rest, self.lr(k, t))


def tied_microbatched(params, batches, optimizer=plain_sgd, *, microbatches: int,
                      tie: Sequence[int], tie_optimizer: Callable[[], object],
                      **settings) -> DDGOracle:
    """Microbatched DDG with a tie: at each clock where uses step, the copies step with the
    sum in stage order of the stepping uses' means (in the drain the uses step apart)."""
    cls = type("TiedMicrobatchedOracle", (TiedOracle, MicrobatchedOracle), {})
    return cls(params, batches, optimizer, microbatches=microbatches, tie=tie,
               tie_optimizer=tie_optimizer, **settings)
