"""stage-momentum, delay-lr and accumulate, each against an independent float64 numpy oracle.

The oracle below is DDG clock by clock on the small tanh network of
``tests/core/test_compensation.py`` (one layer per stage, forward and backward by hand,
weights stashed per minibatch), with the optimizers written out as torch implements them
(SGD with L2 decay, momentum and Nesterov; AdamW; NAdam with decoupled decay), per-stage
clipping, DC-ASGD-a, and the three rules:

  stage-momentum:  beta1_k = b0 + d_k (bmax - b0) / K, set once (Ajanthan et al., AsyncPP);
                   SGD: Nesterov with m_k, lr times (1 - m_k) / (1 - m) on delayed stages
  delay-lr:        lr_k = lr min(1, c / d_k)                       (Mishchenko et al.)
  accumulate:      a delayed stage sums its gradients and steps every A of them with their
                   mean, at that clock's lr; the leftover at the end of the drain with the
                   mean and the lr of its last gradient's clock      (PipeDream-2BW, PACI)

K = 2 and 3, to 1e-10; every case must also move the weights away from plain DDG.
The K = 1, runtime, threads and resume checks of these rules are cases of
``tests/core/test_compensation.py``; their errors, checkpoints and the stash's sharing of
weight versions are in ``tests/core/test_compensation_checks.py``.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ddgpipe
from ddgpipe.training.optim import decay_groups
from tests.core.test_compensation import (
    DECAY,
    LR,
    MOMENTUM,
    layer_backward,
    layer_forward,
    lr_factor,
    oracle_batches,
)
from tests.methods.test_oracles import numpy_params, tanh_net

BMAX = 0.99
ADAM_LR, BETAS, ADAM_WD, EPS = 0.01, (0.9, 0.999), 0.1, 1e-8
CLIP = 0.5  # clips about half of the tanh network's gradients


# --- the optimizers as torch implements them, in numpy ----------------------------------------

class NpSGD:
    """torch.optim.SGD: g' = g + wd w; b = m b + g' (b = g' at first); w -= lr (g' + m b)
    with Nesterov, else lr b. ``lr_scale`` multiplies the lr (stage-momentum's)."""

    def __init__(self, momentum=MOMENTUM, nesterov=False, lr_scale=1.0):
        self.m, self.nesterov, self.scale, self.b = momentum, nesterov, lr_scale, None

    def step(self, w, g, lr):
        lr = lr * self.scale
        g = [gi + DECAY * wi for gi, wi in zip(g, w)]
        self.b = [gi.copy() for gi in g] if self.b is None else \
            [self.m * bi + gi for bi, gi in zip(self.b, g)]
        upd = [gi + self.m * bi for gi, bi in zip(g, self.b)] if self.nesterov else self.b
        return [wi - lr * ui for wi, ui in zip(w, upd)]


def decayed(w, rate):
    """Decoupled weight decay on the matrices only (nanoGPT's groups, ``decay_groups``)."""
    return [wi * (1 - rate) if wi.ndim >= 2 else wi for wi in w]


class NpAdamW:
    """torch.optim.AdamW, weight decay on the matrix only (decay_groups)."""

    def __init__(self, beta1=BETAS[0], beta2=BETAS[1], wd=ADAM_WD):
        self.b1, self.b2, self.wd, self.t = beta1, beta2, wd, 0
        self.m = self.v = None

    def step(self, w, g, lr):
        self.t += 1
        if self.m is None:
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
        self.m = self.v = None

    def step(self, w, g, lr):
        self.t += 1
        if self.m is None:
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


def numpy_ddg(params, batches, optimizer, *, base_lr=LR, lr_mult=None, accumulate=None,
              dc=False, clip=None, stash="graph", stats=None):
    """DDG with stage k's optimizer ``optimizer(k, d_k)`` (an Np* object), its lr
    base_lr * lr_factor(t) * lr_mult(d_k) (d_k > 0), per-stage clipping at ``clip``
    (g * min(1, clip / (||g|| + 1e-6))), DC-ASGD-a (lambda0 = 2, beta = 0.95) and
    accumulation of A = ``accumulate`` delayed gradients; ``stats`` counts the clipped steps."""
    K, T = len(params), len(batches)
    delays = [K - 1 - k for k in range(K)]
    w = [[a.copy() for a in p] for p in params]
    opts = [optimizer(k, d) for k, d in enumerate(delays)]
    mean_square: list = [None] * K
    sums: list = [None] * K
    count, last_lr = [0] * K, [0.0] * K
    kept, grads = {}, {}
    for t in range(T + K - 1):
        if t < T:
            h = batches[t][0]
            for k in range(K):
                kept[(k, t)] = (h, [a.copy() for a in w[k]])
                h = layer_forward(h, *w[k], last=k == K - 1)
        for k in range(K):
            d, s = delays[k], t - delays[k]
            if not 0 <= s < T:
                continue
            h, u = kept.pop((k, s))
            if k == K - 1:
                y = batches[s][1]
                grad_out = 2.0 * (layer_forward(h, *u, last=True) - y) / y.size
            else:
                grad_out = grads.pop((k, s))
            at = w[k] if stash == "none" and d > 0 else u
            g, grad_in = layer_backward(h, *at, last=k == K - 1, grad_out=grad_out)
            if k > 0:
                grads[(k - 1, s)] = grad_in
            if clip is not None:
                coef = clip / (math.sqrt(sum(float((gi * gi).sum()) for gi in g)) + 1e-6)
                if stats is not None:
                    stats["clipped"] = stats.get("clipped", 0) + (coef < 1)
                g = [gi * min(1.0, coef) for gi in g]
            if d > 0 and dc:
                if mean_square[k] is None:
                    mean_square[k] = [np.zeros_like(a) for a in g]
                mean_square[k] = [0.95 * ms + 0.05 * gi * gi for ms, gi in zip(mean_square[k], g)]
                g = [gi + 2.0 / np.sqrt(ms + 1e-7) * gi * gi * (wi - ui)
                     for gi, ms, wi, ui in zip(g, mean_square[k], w[k], u)]
            lr = base_lr * lr_factor(t) * (lr_mult(d) if lr_mult and d > 0 else 1.0)
            if d > 0 and accumulate:
                sums[k] = g if sums[k] is None else [a + b for a, b in zip(sums[k], g)]
                count[k], last_lr[k] = count[k] + 1, lr
                if count[k] == accumulate:
                    w[k] = opts[k].step(w[k], [a / accumulate for a in sums[k]], lr)
                    sums[k], count[k] = None, 0
            else:
                w[k] = opts[k].step(w[k], g, lr)
    for k in range(K):  # the end of the drain: the leftover gradients, with their mean
        if count[k]:
            w[k] = opts[k].step(w[k], [a / count[k] for a in sums[k]], last_lr[k])
    return w


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


def torch_ddg(stages, batches, optimizer, compensation=None, options=None, stash="graph",
              clip=None, executor=None, float64=True):
    model = tanh_net([5, 7, 6, 3][: stages + 1], seed=3)
    start = numpy_params(model)
    with float64_default() if float64 else contextlib.nullcontext():
        pipe = ddgpipe.DDG(
            model, stages, optimizer, stash=stash, clip_grad=clip, compensation=compensation,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor),
            compensation_options=options, executor=executor)
        for x, y in batches:
            pipe.step(torch.from_numpy(x), torch.from_numpy(y), F.mse_loss)
        pipe.drain()
    return start, numpy_params(model)


def torch_sgd(nesterov=False):
    return lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM, weight_decay=DECAY,
                                      nesterov=nesterov)


def torch_adam(kind):
    cls = {"adamw": torch.optim.AdamW, "nadam": torch.optim.NAdam}[kind]
    extra = {"decoupled_weight_decay": True} if kind == "nadam" else {}
    return lambda ps: cls(decay_groups(ps, ADAM_WD), lr=ADAM_LR, betas=BETAS, eps=EPS, **extra)


def momentum_of(base, d, K, top=BMAX):
    return base + d * (top - base) / K


def np_optimizer(kind, K, staged=False, top=BMAX, nesterov=False):
    """Stage k's numpy optimizer; ``staged``: with stage-momentum's coefficients."""
    def make(k, d):
        if kind == "sgd":
            if staged and d > 0:
                m = momentum_of(MOMENTUM, d, K, top)
                return NpSGD(m, nesterov=True, lr_scale=(1 - m) / (1 - MOMENTUM))
            return NpSGD(nesterov=nesterov)
        beta1 = momentum_of(BETAS[0], d, K, top) if staged else BETAS[0]
        return {"adamw": NpAdamW, "nadam": NpNAdam}[kind](beta1)
    return make


CASES = {  # name -> (compensation, options, optimizer kind, stash, oracle keywords)
    "stage-momentum sgd": ("stage-momentum", None, "sgd", "graph", {"staged": True}),
    "stage-momentum nesterov": ("stage-momentum", None, "sgd+nesterov", "graph",
                                {"staged": True}),
    "stage-momentum max": ("stage-momentum", {"stage_momentum_max": 0.95}, "sgd", "graph",
                           {"staged": True, "top": 0.95}),
    "stage-momentum nadam": ("stage-momentum", None, "nadam", "graph", {"staged": True}),
    "stage-momentum adamw": ("stage-momentum", None, "adamw", "recompute", {"staged": True}),
    "delay-lr": ("delay-lr", None, "sgd", "graph", {"lr_mult": 1.0}),
    "delay-lr c": ("delay-lr", {"delay_lr_c": 0.5}, "nadam", "graph", {"lr_mult": 0.5}),
    "accumulate": ("accumulate", None, "sgd", "graph", {"accumulate": 4}),
    "accumulate 3 nadam": ("accumulate", {"accumulate_steps": 3}, "nadam", "recompute",
                           {"accumulate": 3}),
    "accumulate none": ("accumulate", {"accumulate_steps": 2}, "sgd", "none",
                        {"accumulate": 2}),
    "accumulate,dc": ("accumulate,dc", {"accumulate_steps": 2}, "sgd", "graph",
                      {"accumulate": 2, "dc": True}),
    "accumulate,delay-lr": ("accumulate,delay-lr", {"accumulate_steps": 3, "delay_lr_c": 0.5},
                            "adamw", "graph", {"accumulate": 3, "lr_mult": 0.5}),
    "stage-momentum,accumulate,delay-lr": (
        "stage-momentum,accumulate,delay-lr", {"accumulate_steps": 2, "delay_lr_c": 0.5},
        "sgd", "recompute", {"staged": True, "accumulate": 2, "lr_mult": 0.5}),
    "accumulate clipped": ("accumulate", {"accumulate_steps": 3}, "nadam", "graph",
                           {"accumulate": 3, "clip": CLIP}),
}


def run_case(name, stages):
    compensation, options, kind, stash, keys = CASES[name]
    keys = dict(keys)
    staged, top, c = keys.pop("staged", False), keys.pop("top", BMAX), keys.pop("lr_mult", None)
    nesterov = kind == "sgd+nesterov"
    kind = "sgd" if nesterov else kind
    factory = torch_sgd(nesterov) if kind == "sgd" else torch_adam(kind)
    batches = oracle_batches(stages)
    start, got = torch_ddg(stages, batches, factory, compensation, options, stash,
                           clip=keys.get("clip"))
    base_lr = LR if kind == "sgd" else ADAM_LR
    lr_mult = (lambda d: min(1.0, c / d)) if c is not None else None
    expected = numpy_ddg(start, batches, np_optimizer(kind, stages, staged, top, nesterov),
                         base_lr=base_lr, lr_mult=lr_mult, stash=stash, **keys)
    plain = numpy_ddg(start, batches, np_optimizer(kind, stages, nesterov=nesterov),
                      base_lr=base_lr, stash=stash, clip=keys.get("clip"))
    return got, expected, plain


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_independent_numpy(name, stages):
    got, expected, plain = run_case(name, stages)
    for (w, b), (ew, eb) in zip(got, expected):
        np.testing.assert_allclose(w, ew, rtol=0, atol=1e-10)
        np.testing.assert_allclose(b, eb, rtol=0, atol=1e-10)
    moved = max(np.abs(g[0] - p[0]).max() for g, p in zip(got, plain))
    if name == "delay-lr" and stages == 2:
        assert moved < 1e-12  # c = 1 >= K-1: the identity
    else:
        assert moved > 1e-6, "the rule did not change the update"


@pytest.mark.parametrize("stages", [2, 3])
def test_the_clip_is_active_in_the_clipped_case(stages):
    batches = oracle_batches(stages)
    start = numpy_params(tanh_net([5, 7, 6, 3][: stages + 1], seed=3))
    stats: dict = {}
    numpy_ddg(start, batches, np_optimizer("nadam", stages), base_lr=ADAM_LR, clip=CLIP,
              stats=stats)
    assert 0 < stats["clipped"] < stages * len(batches)  # some gradients clipped, not all


def test_stage_momentum_coefficients():
    """AsyncPP's numbers: K = 8, b0 = 0.9 gives 0.97875 at stage 0 and 0.9 at the last."""
    from ddgpipe.core.compensation.stage_momentum import stage_momentum

    assert stage_momentum(0.9, 7, 8, 0.99) == pytest.approx(0.97875)
    assert stage_momentum(0.9, 0, 8, 0.99) == 0.9
    assert stage_momentum(0.99, 3, 8, 0.99) == pytest.approx(0.99)


def test_stage_momentum_sets_muon_and_adamw_momentum():
    from ddgpipe.training.optim import make_optimizer

    pipe = ddgpipe.DDG(tanh_net([5, 7, 6, 3], seed=3), 3,
                       make_optimizer("muon", 0.01, weight_decay=0.1, betas=(0.9, 0.95)),
                       compensation="stage-momentum", executor="reference")
    for stage in pipe.stages:
        opt = stage.optimizer
        d = stage.delay
        assert opt.muon.param_groups[0]["momentum"] == pytest.approx(momentum_of(0.95, d, 3))
        assert opt.muon.param_groups[0]["nesterov"] is True
        assert opt.adamw.param_groups[0]["betas"] == (pytest.approx(momentum_of(0.9, d, 3)),
                                                      0.95)
        assert stage.compensation.by_phase["optimizer"].lr_scales() is None
