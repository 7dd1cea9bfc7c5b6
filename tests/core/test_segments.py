"""Recompute block by block: bitwise the gradients of the kept graph and of a whole-stage
replay, one block's graph alive at a time, and the cases that fall back to a whole replay."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

from ddgpipe.core.stash import Stash
from ddgpipe.core.values import Blocks


class Pair(nn.Module):
    """A block that takes and returns a tuple: features and token-like ids (no gradient)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)

    def forward(self, h: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.drop(torch.relu(self.norm(self.lin(h)))) + ids.unsqueeze(1), ids


def blocks(n: int = 4, tied: bool = False) -> Blocks:
    torch.manual_seed(0)
    parts = [Pair() for _ in range(n)]
    if tied:
        parts[-1].lin.weight = parts[0].lin.weight
    return Blocks(OrderedDict((str(i), p) for i, p in enumerate(parts)))


class SavedBytes:
    """The bytes autograd holds for backward, now and at most (a saved-tensor hook)."""

    def __init__(self):
        self.now = self.peak = 0

    def pack(self, t: Tensor):
        counter, size = self, t.numel() * t.element_size()

        class Held:
            def __init__(self):
                self.t = t
                counter.now += size
                counter.peak = max(counter.peak, counter.now)

            def __del__(self):
                counter.now -= size

        return Held()

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda held: held.t)


def train_once(mode: str, by_blocks: bool = True, module: Blocks | None = None,
               meter: SavedBytes | None = None):
    """One stashed minibatch: forward, the weights change, the delayed backward."""
    module = module if module is not None else blocks()
    stash = Stash(module, mode, 1, needs_input_grad=True)
    if not by_blocks:
        stash.by_blocks = None
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 8, generator=g).requires_grad_(True),
         torch.randint(0, 3, (16,), generator=g))
    torch.manual_seed(7)
    out, pending = stash.forward(0, x)
    pending.output_marks = [True, False]
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.5).add_(0.125)
    torch.rand(100)  # the process draws on before the backward
    with meter.hooks() if meter else torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t):
        output = stash.output_for_backward(pending)
        grad_in = stash.backward(pending, output, (torch.ones(16, 8),))
    assert grad_in is not None
    return ({n: p.grad.clone() for n, p in module.named_parameters()}, grad_in[0].clone(),
            {n: b.clone() for n, b in module.named_buffers()}, stash)


def assert_bitwise(a, b):
    for x, y in ((a[0], b[0]), (a[2], b[2])):
        assert x.keys() == y.keys()
        for name in x:
            assert torch.equal(x[name], y[name]), name
    assert torch.equal(a[1], b[1])


def test_by_blocks_equals_the_whole_replay_and_the_kept_graph_bitwise():
    by_blocks = train_once("recompute")
    assert by_blocks[3].by_blocks is not None
    assert_bitwise(by_blocks, train_once("recompute", by_blocks=False))
    assert_bitwise(by_blocks, train_once("graph"))


def test_by_blocks_holds_one_block_of_saved_tensors_at_a_time():
    whole, split = SavedBytes(), SavedBytes()
    train_once("recompute", by_blocks=False, meter=whole)
    train_once("recompute", meter=split)
    one_block = whole.peak / 4  # four blocks alike
    assert split.peak == pytest.approx(one_block, rel=0.01)
    assert whole.now == split.now == 0, "every saved tensor is freed after the backward"


def test_tied_weights_and_none_replay_the_whole_stage():
    tied = train_once("recompute", module=blocks(tied=True))
    assert tied[3].by_blocks is None  # a tie's two gradients must meet in one backward
    assert_bitwise(tied, train_once("graph", module=blocks(tied=True)))
    # none replays at today's weights: every block's input must be recomputed
    assert train_once("none")[3].by_blocks is None


def test_a_checkpointed_by_blocks_minibatch_replays_whole_to_the_same_gradients():
    module = blocks()
    stash = Stash(module, "recompute", 1, needs_input_grad=True)
    x = (torch.randn(16, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True),
         torch.arange(16) % 3)
    torch.manual_seed(7)
    _, pending = stash.forward(0, x)
    pending.output_marks = [True, False]
    pending.grad_shapes = [((16, 8), torch.float32)]
    restored = stash.restore(stash.export(pending))
    assert restored.boundaries is None
    grads = []
    for p in (pending, restored):
        grad_in = stash.backward(p, stash.output_for_backward(p), (torch.ones(16, 8),))
        assert grad_in is not None
        grads.append(([q.grad.clone() for q in module.parameters()], grad_in[0]))
    assert all(torch.equal(a, b) for a, b in zip(grads[0][0], grads[1][0], strict=True))
    assert torch.equal(grads[0][1], grads[1][1])
