"""``wp``, optimizer-dependent weight prediction (PipeOptim), against references it cannot fake.

1. A float64 numpy DDG on the small tanh network of ``tests/core/test_compensation.py``, whose
   delayed stages run their forward (and keep it for the backward) at ``w - lr_t d_k u``, u
   written out from the papers' formulas over the numpy optimizer's own state:

     AdamW:  u = m_hat / (sqrt(v_hat) + eps) + wd w    (m_hat = m / (1 - b1^t), likewise v)
     NAdam:  u = [(1 - mu_t)/(1 - P_t) m_hat + mu_{t+1}/(1 - P_t mu_{t+1}) m] / denom + wd w
             (denom = sqrt(v / (1 - b2^t)) + eps, P_t = mu_1 ... mu_t)

   before a stage's first step u = 0; K = 2 and 3, to 1e-10, with a changing lr.
2. Momentum SGD: ``wp`` is ``lwp``, bitwise.
3. K = 1 is backprop bitwise; the threaded executor equals the reference bitwise; a resume
   mid-pipeline is bitwise the uninterrupted run.
4. Optimizers without a rule are refused, naming the fix.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ddgpipe
from ddgpipe.cli import main
from ddgpipe.training.optim import decay_groups
from tests.helpers import assert_state_equal, batches, resnet, sgd
from tests.oracles import (
    ADAM_LR,
    ADAM_WD,
    BETAS,
    EPS,
    NpAdamW,
    NpNAdam,
    decayed,
    layer_backward,
    layer_forward,
    lr_factor,
    oracle_batches,
    torch_ddg,
)


def digits_like_batches(n: int, batch: int = 16, seed: int = 1):
    return batches(n, sizes=batch, seed=seed)

NADAM_PSI = 0.3  # a fast momentum schedule: mu moves visibly within the run


# --- 1. the rule, independently in numpy --------------------------------------------------------

def adamw_direction(opt: NpAdamW, w):
    c1, c2 = 1 - opt.b1**opt.t, 1 - opt.b2**opt.t
    u = [(m / c1) / (np.sqrt(v / c2) + EPS) for m, v in zip(opt.m, opt.v)]
    return [ui + (wi - d) for ui, wi, d in zip(u, w, decayed(w, opt.wd))]  # + wd w


def nadam_direction(opt: NpNAdam, w):
    t = opt.t
    mu = opt.b1 * (1 - 0.5 * 0.96 ** (t * opt.psi))
    mu_next = opt.b1 * (1 - 0.5 * 0.96 ** ((t + 1) * opt.psi))
    a = (1 - mu) / (1 - opt.prod) / (1 - opt.b1**t)
    b = mu_next / (1 - opt.prod * mu_next)
    u = [(a + b) * m / (np.sqrt(v / (1 - opt.b2**t)) + EPS) for m, v in zip(opt.m, opt.v)]
    return [ui + (wi - d) for ui, wi, d in zip(u, w, decayed(w, opt.wd))]


def numpy_wp(params, batches, make_optimizer, direction, predict=True):
    """DDG clock by clock (one layer per stage, weights stashed per minibatch); a delayed
    stage's forward at clock t uses ``w - lr_t d_k u`` once it has stepped."""
    K, T = len(params), len(batches)
    delays = [K - 1 - k for k in range(K)]
    w = [[a.copy() for a in p] for p in params]
    opts = [make_optimizer() for _ in range(K)]
    kept, grads = {}, {}
    for t in range(T + K - 1):
        lr = ADAM_LR * lr_factor(t)
        if t < T:
            h = batches[t][0]
            for k in range(K):
                u = [a.copy() for a in w[k]]
                if predict and delays[k] > 0 and opts[k].t > 0:
                    u = [a - lr * delays[k] * da for a, da in zip(w[k], direction(opts[k], w[k]))]
                kept[(k, t)] = (h, u)
                h = layer_forward(h, *u, last=k == K - 1)
        for k in range(K):
            s = t - delays[k]
            if not 0 <= s < T:
                continue
            h, u = kept.pop((k, s))
            if k == K - 1:
                y = batches[s][1]
                grad_out = 2.0 * (layer_forward(h, *u, last=True) - y) / y.size
            else:
                grad_out = grads.pop((k, s))
            g, grad_in = layer_backward(h, *u, last=k == K - 1, grad_out=grad_out)
            if k > 0:
                grads[(k - 1, s)] = grad_in
            w[k] = opts[k].step(w[k], g, lr)
    return w


def torch_factory(kind):
    if kind == "adamw":
        return lambda ps: torch.optim.AdamW(decay_groups(ps, ADAM_WD), lr=ADAM_LR, betas=BETAS,
                                            eps=EPS)
    return lambda ps: torch.optim.NAdam(decay_groups(ps, ADAM_WD), lr=ADAM_LR, betas=BETAS,
                                        eps=EPS, momentum_decay=NADAM_PSI,
                                        decoupled_weight_decay=True)


NUMPY = {"adamw": (NpAdamW, adamw_direction),
         "nadam": (lambda: NpNAdam(psi=NADAM_PSI), nadam_direction)}


def max_gap(a, b):
    return max(np.abs(x - y).max() for p, q in zip(a, b) for x, y in zip(p, q))


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("kind", ["adamw", "nadam"])
def test_wp_matches_independent_numpy(kind, stages):
    batches = oracle_batches(stages)
    start, got = torch_ddg(stages, batches, torch_factory(kind), "wp")
    make, direction = NUMPY[kind]
    expected = numpy_wp(start, batches, make, direction)
    assert max_gap(got, expected) < 1e-10
    plain = numpy_wp(start, batches, make, direction, predict=False)
    assert max_gap(got, plain) > 1e-6, "the prediction did not change the update"


def test_the_numpy_nadam_direction_is_its_step_when_the_gradient_is_its_mean():
    """The oracle's NAdam direction is NAdam's own step when g = m_hat: here at the first
    step (m_hat = g exactly), with the decay; a check of the stand-in, not of torch."""
    rng = np.random.default_rng(0)
    w, g = [rng.normal(size=(3, 4)), rng.normal(size=3)], [rng.normal(size=(3, 4)),
                                                           rng.normal(size=3)]
    opt = NpNAdam(psi=NADAM_PSI)
    after = opt.step(w, g, 0.01)
    for before, moved, u in zip(w, after, nadam_direction(opt, w)):
        np.testing.assert_allclose((before - moved) / 0.01, u, rtol=1e-12, atol=1e-12)


# --- 2. momentum SGD: wp is lwp ------------------------------------------------------------------

def test_wp_with_momentum_sgd_is_lwp_bitwise():
    data = digits_like_batches(4)
    runs = []
    for compensation in ("lwp", "wp"):
        model = resnet()
        pipe = ddgpipe.DDG(model, 3, sgd(), compensation=compensation, executor="reference")
        losses = [pipe.step(x, y, F.cross_entropy) for x, y in data]
        pipe.drain()
        runs.append((losses, model))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert_state_equal(runs[0][1], runs[1][1])


# --- 3. backprop, executors, resume --------------------------------------------------------------

def adamw(ps):
    return torch.optim.AdamW(decay_groups(ps, 0.1), lr=3e-3)


def nadam(ps):
    return torch.optim.NAdam(decay_groups(ps, 0.1), lr=3e-3, betas=(0.99, 0.999),
                             momentum_decay=0.05, decoupled_weight_decay=True)


def test_k1_with_wp_equals_backprop_bitwise():
    data = digits_like_batches(3)
    bp_model, ddg_model = resnet(), resnet()
    bp = ddgpipe.Backprop(bp_model, adamw)
    pipe = ddgpipe.DDG(ddg_model, stages=1, optimizer=adamw, compensation="wp")
    for x, y in data:
        assert torch.equal(bp.step(x, y, F.cross_entropy), pipe.step(x, y, F.cross_entropy))
    pipe.drain()
    assert_state_equal(bp_model, ddg_model)


@pytest.mark.parametrize("optimizer", [adamw, nadam])
def test_threads_match_reference_bitwise(optimizer):
    from tests.helpers import dropout_convnet as make_model
    from tests.helpers import ragged_batches as batches
    from tests.helpers import step_lr
    from tests.runtime_helpers import run_clocks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for executor in ("reference", "threads"):
            torch.manual_seed(3)
            pipe = ddgpipe.DDG(make_model(), 3, optimizer, lr_scheduler=step_lr(),
                               compensation="wp", executor=executor, threads=1,
                               peer_timeout_s=30)
            runs.append((run_clocks(pipe, 0, 1, batches(7)), pipe.model.state_dict()))
    finally:
        torch.set_num_threads(threads)
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name]), name


def dropout_pipe(optimizer):
    from torch import nn

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Dropout(0.3)) for _ in range(3)]
    return ddgpipe.DDG(nn.Sequential(*blocks, nn.Linear(6, 3)), 3, optimizer, split=[1, 2],
                       compensation="wp")


@pytest.mark.parametrize("optimizer", [adamw, nadam])
def test_resume_mid_pipeline_is_bitwise(optimizer):
    """wp keeps no state of its own: the optimizer's moments and step count, which the
    checkpoint holds, are all it predicts from."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(9)]
    uninterrupted = dropout_pipe(optimizer)
    for x, y in data:
        uninterrupted.step(x, y, F.cross_entropy)
    uninterrupted.drain()

    first = dropout_pipe(optimizer)
    for x, y in data[:5]:
        first.step(x, y, F.cross_entropy)
    saved = io.BytesIO()
    torch.save(first.checkpoint_state(), saved)
    resumed = dropout_pipe(optimizer)
    resumed.load_checkpoint_state(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    for x, y in data[5:]:
        resumed.step(x, y, F.cross_entropy)
    resumed.drain()
    assert_state_equal(uninterrupted.model, resumed.model)
    assert first.checkpoint_state()["stages"][0]["compensation"] == {"wp": {}}


# --- 4. errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer,message", [
    (lambda ps: torch.optim.RMSprop(ps, lr=1e-3), "RMSprop has no rule here"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1), "needs SGD with momentum > 0"),
    (lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True), "without amsgrad and maximize"),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3, maximize=True), "without amsgrad and maximize"),
])
def test_optimizers_without_a_rule_are_refused(optimizer, message):
    with pytest.raises(ddgpipe.UsageError, match=message):
        ddgpipe.DDG(resnet(), 2, optimizer, compensation="wp")


def test_wp_with_accumulate_is_refused():
    with pytest.raises(ddgpipe.UsageError, match="wp predicts d_k optimizer steps ahead"):
        ddgpipe.DDG(resnet(), 2, adamw, compensation="wp,accumulate")


def test_lwp_with_adam_points_to_wp():
    with pytest.raises(ddgpipe.UsageError, match=r"got AdamW: .*wp predicts for Adam"):
        ddgpipe.DDG(resnet(), 2, adamw, compensation="lwp")


def test_cli_refuses_wp_with_muon_before_training(capsys):
    code = main(["train", "--method", "ddg", "--stages", "2", "--optimizer", "muon",
                 "--compensation", "wp", "--no-progress", "--out", "unused"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "MuonAdamW has no rule here" in err


def test_prediction_before_the_first_step_is_the_live_weights():
    """u = 0 before a stage has stepped: the first forwards use the weights as they are."""
    model = resnet()
    pipe = ddgpipe.DDG(model, 2, adamw, compensation="wp", executor="reference")
    stage = pipe.stages[0]
    predicted = stage.compensation.forward_weights()
    assert all(torch.equal(predicted[n], p) for n, p in stage.params.items())
    assert math.isclose(stage.optimizer.param_groups[0]["lr"], 3e-3)
