"""Mixed precision in every executor: autocast per stage, and fp16 loss scaling whose scale
travels with each minibatch's delayed gradient (ddgpipe/precision.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddgpipe
from ddgpipe.core.precision import LossScaler
from ddgpipe.runtime.launch import run_workers
from tests.helpers import batches, conv_block, pool_head, sgd, train
from tests.runtime_helpers import assert_runtime_matches_reference, local_stage_arrays


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        conv_block(1, 8, batchnorm=True),
        conv_block(8, 8, dropout=0.1),
        conv_block(8, 16, stride=2),
        pool_head(16),
    )


optimizer = sgd(weight_decay=0.0)
SEED = 7
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_threads_match_the_reference_in_mixed_precision(precision):
    data = batches(7)
    ref = train(ddgpipe.DDG(model(), 3, optimizer, precision=precision, executor="reference"),
                data, SEED)
    thr = train(ddgpipe.DDG(model(), 3, optimizer, precision=precision, executor="threads",
                            threads=1), data, SEED)
    fp32 = train(ddgpipe.DDG(model(), 3, optimizer, executor="reference"), data, SEED)
    assert thr[0] == ref[0]
    assert all(torch.equal(thr[1][k], ref[1][k]) for k in ref[1])
    assert ref[0] != fp32[0]  # autocast really ran


def test_fp16_overflow_skips_the_step_everywhere_and_halves_the_scale():
    pipe = ddgpipe.DDG(model(), 3, optimizer, precision="fp16", executor="reference")
    pipe.stages[-1].loss_scaler.scale = 2.0**100  # every gradient overflows
    before = {k: v.clone() for k, v in pipe.model.state_dict().items() if "weight" in k}
    for x, y in batches(4):
        pipe.step(x, y, F.cross_entropy)
    pipe.drain()
    assert [s.overflow_skips for s in pipe.stages] == [4, 4, 4]
    after = pipe.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no step was applied
    scaler = pipe.stages[-1].loss_scaler
    # Four clocks with an overflow (the drain's two clocks have none): halved four times.
    assert scaler.scale == 2.0**96 and scaler.clean_clocks == 2


def test_fp16_unscales_each_gradient_by_the_scale_its_loss_used():
    """Growing the scale every clock must not change the update: each minibatch's gradient
    is divided by the scale of *its* loss, which changed since (powers of two are exact;
    a stage dividing by the current scale would be off by 2**delay)."""
    data = batches(6)

    def run(growth_interval):
        pipe = ddgpipe.DDG(model(), 3, optimizer, precision="fp16", executor="reference")
        pipe.stages[-1].loss_scaler = LossScaler(2.0**8, growth_interval=growth_interval)
        return train(pipe, data, SEED)[1], pipe.stages[-1].loss_scaler.scale

    growing, grown = run(growth_interval=1)
    steady, kept = run(growth_interval=10**6)
    assert grown == 2.0**(8 + 8) and kept == 2.0**8  # 8 clean clocks: 6 fed + 2 drained
    for name in steady:
        if steady[name].is_floating_point():
            torch.testing.assert_close(growing[name], steady[name], rtol=1e-3, atol=1e-6)


def stage_worker(rank, world, precision, clocks):
    torch.manual_seed(1234)
    pipe = ddgpipe.DDG(model(), world, optimizer, precision=precision, peer_timeout_s=30)
    first, last = rank == 0, rank == world - 1
    losses = []
    for x, y in batches(clocks):
        loss = pipe.step(x if first else None, y if last else None,
                         F.cross_entropy if last else None)
        losses.append(None if loss is None else loss.item())
    pipe.drain()
    return {"state": local_stage_arrays(pipe), "losses": losses}


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=pytest.mark.slow), "fp16"])
def test_processes_match_the_reference_in_mixed_precision(precision):
    """Half-precision activations cross processes with their dtype, fp16 scales with the
    gradients."""
    clocks = 5
    results = run_workers(stage_worker, 2, (precision, clocks), timeout_s=120, threads=1)
    assert_runtime_matches_reference(
        results, lambda: ddgpipe.DDG(model(), 2, optimizer, precision=precision,
                                     executor="reference"), batches(clocks))


def test_bad_precision_and_dni_fp16_are_refused():
    with pytest.raises(ddgpipe.UsageError, match="unknown precision 'fp8'"):
        ddgpipe.DDG(model(), 2, optimizer, precision="fp8")
    from ddgpipe.methods.dni import DNI

    with pytest.raises(ddgpipe.UsageError, match="use --precision bf16"):
        DNI(model(), 2, optimizer, precision="fp16")
