"""stage-momentum, delay-lr and accumulate, each against an independent float64 numpy oracle.

The oracle is ``tests/oracles.py``'s DDG clock by clock on the small tanh network (one layer
per stage, forward and backward by hand, weights stashed per minibatch), with the optimizers
written out as torch implements them (SGD with L2 decay, momentum and Nesterov; AdamW; NAdam
with decoupled decay), per-stage clipping, DC-ASGD-a (``tests/oracle_rules.py``), and the
three rules:

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

import numpy as np
import pytest
import torch

import ddgpipe
from ddgpipe.training.optim import decay_groups
from tests.oracle_rules import DCASGD, Accumulate, DelayLR
from tests.oracles import (
    ADAM_LR,
    ADAM_WD,
    BETAS,
    BMAX,
    EPS,
    LR,
    MOMENTUM,
    DDGOracle,
    NpAdamW,
    NpNAdam,
    NpSGD,
    compensated_ddg,
    lr_factor,
    momentum_of,
    numpy_params,
    oracle_batches,
    tanh_net,
    torch_ddg,
    torch_sgd,
)

CLIP = 0.5  # clips about half of the tanh network's gradients


def torch_adam(kind):
    cls = {"adamw": torch.optim.AdamW, "nadam": torch.optim.NAdam}[kind]
    extra = {"decoupled_weight_decay": True} if kind == "nadam" else {}
    return lambda ps: cls(decay_groups(ps, ADAM_WD), lr=ADAM_LR, betas=BETAS, eps=EPS, **extra)


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


def rules_of(keys: dict) -> tuple[list[type[DDGOracle]], dict]:
    """The oracle's rules and their options for a case's keywords."""
    rules, options = [], {}
    if keys.get("accumulate"):
        rules.append(Accumulate)
        options["accumulate_steps"] = keys["accumulate"]
    if keys.get("lr_mult") is not None:
        rules.append(DelayLR)
        options["delay_lr_c"] = keys["lr_mult"]
    if keys.get("dc"):
        rules.append(DCASGD)
    return rules, options


def run_case(name, stages):
    compensation, options, kind, stash, keys = CASES[name]
    keys = dict(keys)
    staged, top = keys.pop("staged", False), keys.pop("top", BMAX)
    nesterov = kind == "sgd+nesterov"
    kind = "sgd" if nesterov else kind
    factory = torch_sgd(nesterov) if kind == "sgd" else torch_adam(kind)
    batches = oracle_batches(stages)
    start, got = torch_ddg(stages, batches, factory, compensation, options, stash,
                           clip=keys.get("clip"))
    base_lr = LR if kind == "sgd" else ADAM_LR
    rules, rule_options = rules_of(keys)
    expected = compensated_ddg(start, batches, np_optimizer(kind, stages, staged, top, nesterov),
                               rules, lr=base_lr, stash=stash, clip=keys.get("clip"),
                               options=rule_options)
    plain = compensated_ddg(start, batches, np_optimizer(kind, stages, nesterov=nesterov),
                            lr=base_lr, stash=stash, clip=keys.get("clip"))
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
    oracle = DDGOracle(start, batches, np_optimizer("nadam", stages), lr=ADAM_LR,
                       schedule=lr_factor, clip=CLIP)
    oracle.run()
    assert 0 < oracle.clipped < stages * len(batches)  # some gradients clipped, not all


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
