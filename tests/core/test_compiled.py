"""``compile=True``: the compiled stages keep the executors' bitwise agreement, backprop and
DDG with one stage still agree bitwise, and compiled numbers stay within rounding of eager
ones (no dropout: compiled kernels draw their own masks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddgpipe
from tests.helpers import batches, sgd

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh()),
        nn.Sequential(nn.Linear(16, 16), nn.GELU()),
        nn.Sequential(nn.Linear(16, 4)),
    )


optimizer = sgd(lr=0.1, weight_decay=0.0)


def train(method) -> tuple[list[float], list[torch.Tensor]]:
    losses = [method.step(x, y, F.cross_entropy).item() for x, y in batches(6, (6,), classes=4)]
    method.drain()
    weights = [p.detach().clone() for p in method.model.parameters()]
    method.close()
    return losses, weights


def ddg(executor: str, stash: str = "graph", stages: int = 2, compile: bool = True):
    return ddgpipe.DDG(model(), stages, optimizer, stash=stash, executor=executor, threads=1,
                       split=[1] if stages == 2 else None, compile=compile)


@pytest.mark.parametrize("stash", ["graph", "recompute"])
def test_compiled_threads_equal_compiled_reference_bitwise(stash):
    ref_losses, ref_weights = train(ddg("reference", stash))
    losses, weights = train(ddg("threads", stash))
    assert losses == ref_losses
    assert all(torch.equal(a, b) for a, b in zip(weights, ref_weights, strict=True))


def test_compiled_backprop_equals_compiled_one_stage_ddg_bitwise():
    bp_losses, bp_weights = train(ddgpipe.Backprop(model(), optimizer, compile=True))
    losses, weights = train(ddg("reference", stages=1))
    assert losses == bp_losses
    assert all(torch.equal(a, b) for a, b in zip(weights, bp_weights, strict=True))


def test_compiled_stays_within_rounding_of_eager():
    eager_losses, eager_weights = train(ddg("reference", compile=False))
    losses, weights = train(ddg("reference"))
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    for a, b in zip(weights, eager_weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
