"""Microbatched DDG: the float64 numpy oracle (tests/oracles.py, ``MicrobatchedOracle``), K = 1
against backprop, the loss a minibatch reports, and what it refuses."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ddgpipe
from ddgpipe.core.compensation import COMPENSATIONS
from ddgpipe.core.compensation.options import MICROBATCH_REFUSALS
from ddgpipe.errors import UsageError
from ddgpipe.training.optim import decay_groups
from tests.helpers import assert_state_equal, batches, resnet, sgd
from tests.oracles import (
    ADAM_LR,
    ADAM_WD,
    BETAS,
    EPS,
    LR,
    WIDTHS,
    MicrobatchedOracle,
    NpAdamW,
    NpSGD,
    lr_factor,
    tanh_net,
    torch_ddg,
    torch_sgd,
)


def six_row_batches(stages: int, count: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Minibatches of six rows: two or three microbatches each."""
    rng = np.random.default_rng(1)
    return [(rng.normal(size=(6, WIDTHS[0])), rng.normal(size=(6, WIDTHS[stages])))
            for _ in range(count)]


def max_gap(a, b):
    return max(np.abs(x - y).max() for p, q in zip(a, b) for x, y in zip(p, q))


def adamw(ps):
    return torch.optim.AdamW(decay_groups(ps, ADAM_WD), lr=ADAM_LR, betas=BETAS, eps=EPS)


OPTIMIZERS = {
    "sgd": (torch_sgd(), lambda k, d: NpSGD(), LR),
    "adamw": (adamw, lambda k, d: NpAdamW(), ADAM_LR),
}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("microbatches", [2, 3])
@pytest.mark.parametrize("stages", [2, 3])
def test_matches_the_numpy_oracle(stages, microbatches, optimizer):
    factory, numpy_optimizer, lr = OPTIMIZERS[optimizer]
    minibatches = six_row_batches(stages)
    start, got = torch_ddg(stages, minibatches, factory, microbatches=microbatches)
    expected = MicrobatchedOracle(start, minibatches, numpy_optimizer, lr=lr,
                                  schedule=lr_factor, microbatches=microbatches).run()
    assert max_gap(got, expected) < 1e-10
    assert max_gap(got, start) > 1e-3  # it trained
    # and microbatches change the numbers: per-minibatch DDG lands elsewhere
    _, per_minibatch = torch_ddg(stages, minibatches, factory)
    assert max_gap(got, per_minibatch) > 1e-6


def test_oracle_with_one_microbatch_is_ddg():
    minibatches = six_row_batches(3)
    start, got = torch_ddg(3, minibatches, torch_sgd())
    expected = MicrobatchedOracle(start, minibatches, lambda k, d: NpSGD(), lr=LR,
                                  schedule=lr_factor, microbatches=1).run()
    assert max_gap(got, expected) < 1e-10


def test_one_microbatch_is_ddg_bitwise():
    data = batches(4, sizes=8)
    plain, micro = resnet(), resnet()
    a = ddgpipe.DDG(plain, stages=3, optimizer=sgd(), executor="reference")
    b = ddgpipe.DDG(micro, stages=3, optimizer=sgd(), executor="reference", microbatches=1)
    for x, y in data:
        assert torch.equal(a.step(x, y, F.cross_entropy), b.step(x, y, F.cross_entropy))
    a.drain(), b.drain()
    assert_state_equal(plain, micro)


@pytest.mark.parametrize("microbatches", [2, 4])
def test_one_stage_is_backprop_on_the_minibatch(microbatches):
    """K = 1: the mean of M microbatch gradients is the minibatch's, up to a float sum."""
    torch.manual_seed(0)
    data = [(torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64))
            for _ in range(4)]
    bp_model, ddg_model = tanh_net([5, 7, 3], seed=2), tanh_net([5, 7, 3], seed=2)
    bp = ddgpipe.Backprop(bp_model, torch_sgd())
    pipe = ddgpipe.DDG(ddg_model, stages=1, optimizer=torch_sgd(), microbatches=microbatches)
    for x, y in data:
        expected = bp.step(x, y, F.mse_loss)
        assert pipe.step(x, y, F.mse_loss).item() == pytest.approx(expected.item(), rel=1e-12)
    pipe.drain()
    gap = max((p - q).abs().max().item()
              for p, q in zip(bp_model.parameters(), ddg_model.parameters()))
    assert gap < 1e-12
    assert [s.steps for s in pipe.stages] == [4]


def test_loss_is_the_mean_of_the_microbatch_losses():
    torch.manual_seed(0)
    model = tanh_net([5, 7, 3], seed=2)
    pipe = ddgpipe.DDG(model, stages=2, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0),
                       microbatches=3)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        parts = [F.mse_loss(model(x[i:i + 2]), y[i:i + 2]) for i in range(0, 6, 2)]
    assert pipe.step(x, y, F.mse_loss).item() == pytest.approx(
        torch.stack(parts).mean().item(), rel=1e-14)
    assert pipe.fed == 1
    losses = list(pipe.run([(x, y)] * 2, F.mse_loss))
    assert len(losses) == 2 and pipe.fed == 3
    pipe.drain()


def test_lr_advances_once_per_minibatch():
    model = tanh_net([5, 7, 6, 3], seed=2)
    pipe = ddgpipe.DDG(model, stages=3, optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0),
                       lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_factor),
                       microbatches=2, executor="reference")
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for _ in range(3):
        pipe.step(x, y, F.mse_loss)
    assert pipe.lr == pytest.approx(lr_factor(3))


def test_a_minibatch_that_does_not_split_is_refused():
    pipe = ddgpipe.DDG(tanh_net([5, 7, 3], seed=2), stages=2,
                       optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), microbatches=4)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(UsageError, match="6 samples.*4 equal microbatches"):
        pipe.step(x, y, F.mse_loss)


@pytest.mark.parametrize("name", sorted(COMPENSATIONS))
def test_each_compensation_composes_or_is_refused_with_its_reason(name):
    optimizer = adamw if name == "wp" else torch_sgd()
    options = {"pipemare_anneal": 4} if name.startswith("pipemare") else None
    stash = "none" if name == "pipemare" else "graph"
    build = lambda: ddgpipe.DDG(  # noqa: E731
        tanh_net([5, 7, 6, 3], seed=2), stages=3, optimizer=optimizer, stash=stash,
        compensation=name, compensation_options=options, microbatches=2, executor="reference")
    if name in MICROBATCH_REFUSALS:
        with pytest.raises(UsageError, match=f"compensation {name} does not compose"):
            build()
        return
    pipe = build()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for _ in range(3):
        assert torch.isfinite(pipe.step(x, y, F.mse_loss))
    pipe.drain()
    assert [s.compensation.rules[0].stale_steps for s in pipe.stages
            if hasattr(s.compensation, "rules")][:2] == [1, 1]


class LinearWeightPredictionInSteps(MicrobatchedOracle):
    """lwp (tests/oracle_rules.py) with its delay in steps: a delayed stage's forward of clock
    t uses w - lr_s ceil(d_k / M) b, s = t // M the step it falls in."""

    def forward_weights(self, k, t):
        steps, buffer = -(-self.delays[k] // self.microbatches), self.optimizers[k].b
        if steps > 0 and buffer is not None:
            lr = self.lr(k, t // self.microbatches)
            return [a - lr * steps * b for a, b in zip(self.w[k], buffer)]
        return super().forward_weights(k, t)


def test_lwp_predicts_ceil_of_delay_over_microbatches_steps():
    """lwp composes with microbatches exactly, predicting ceil(d_k / M) steps ahead."""
    minibatches = six_row_batches(3)
    start, got = torch_ddg(3, minibatches, torch_sgd(), compensation="lwp", microbatches=2)
    expected = LinearWeightPredictionInSteps(start, minibatches, lambda k, d: NpSGD(), lr=LR,
                                             schedule=lr_factor, microbatches=2).run()
    assert max_gap(got, expected) < 1e-10
    _, plain = torch_ddg(3, minibatches, torch_sgd(), microbatches=2)
    assert max_gap(got, plain) > 1e-6  # the prediction changed something


@pytest.mark.parametrize("precision, replicas, match", [
    ("fp16", 1, "fp16"), ("fp32", 2, "replicas")])
def test_what_microbatches_do_not_run_yet_is_refused(precision, replicas, match):
    with pytest.raises(UsageError, match=match):
        ddgpipe.DDG(tanh_net([5, 7, 3], seed=2).float(), stages=2, precision=precision,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), microbatches=2,
                    replicas=replicas, executor="processes" if replicas > 1 else None)
