"""Every stage draws from a random stream of its own, derived from (the caller's state, k):
identical blocks in different stages draw independent dropout masks, as under backprop."""

import pytest
import torch
from torch import nn

import ddgpipe
from ddgpipe.core.rng import rng_state, stage_stream

P = 0.1
AGREEMENT = (1 - P) ** 2 + P**2  # two independent masks of keep-probability 1 - p agree: 0.82
TOLERANCE = 0.02  # > 6 standard deviations at 8 x 4096 entries per comparison


class RecordsMask(nn.Module):
    """A dropout whose mask is recorded, next to a parameter so the stage learns."""

    def __init__(self, width):
        super().__init__()
        self.drop = nn.Dropout(P)
        self.bias = nn.Parameter(torch.zeros(width))
        self.masks = []

    def forward(self, x):
        mask = self.drop(torch.ones_like(x)) != 0
        self.masks.append(mask)
        return x * mask + self.bias


def identical_blocks(n=4, width=4096):
    torch.manual_seed(0)
    return nn.Sequential(*[RecordsMask(width) for _ in range(n)])


def agreement(a, b):
    return (a == b).float().mean().item()


def train(model, stages, executor, clocks=5):
    x, y = torch.randn(8, 4096), torch.randn(8, 4096)
    loss = lambda out, target: (out - target).square().mean()  # noqa: E731
    if stages == 1:
        pipe = ddgpipe.Backprop(model, lambda ps: torch.optim.SGD(ps, lr=0.1))
    else:
        pipe = ddgpipe.DDG(model, stages, lambda ps: torch.optim.SGD(ps, lr=0.1),
                           executor=executor, split=list(range(1, stages)), threads=1)
    for _ in range(clocks):
        pipe.step(x, y, loss)
    pipe.drain()
    return [block.masks for block in model]


@pytest.mark.parametrize("stages,executor", [(1, None), (4, "reference"), (4, "threads")])
def test_identical_blocks_in_different_stages_draw_independent_masks(stages, executor):
    masks = train(identical_blocks(), stages, executor)
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            for a, b in zip(masks[i], masks[j]):  # the same minibatch at blocks i and j
                assert abs(agreement(a, b) - AGREEMENT) < TOLERANCE, (i, j)


def test_stage_streams_are_derived_from_the_state_and_the_stage():
    torch.manual_seed(7)
    base = rng_state()
    assert stage_stream(base, 0) is base  # one stage draws what backprop draws
    streams = [stage_stream(base, k)["cpu"] for k in range(1, 4)]
    assert not any(torch.equal(a, b) for i, a in enumerate(streams) for b in streams[i + 1:])
    assert torch.equal(stage_stream(base, 2)["cpu"], streams[1])  # a function of (state, k)
    torch.manual_seed(8)
    assert not torch.equal(stage_stream(rng_state(), 2)["cpu"], streams[1])
