"""Several tensors between stages (hidden states, a padding mask, a float weight without grad)
and token ids into the first stage: every executor and stash mode bitwise equal to the
reference, and a checkpoint taken mid-pipeline resumes bitwise."""

import io

import pytest
import torch
from torch import nn

import ddgpipe
from ddgpipe.losses import token_cross_entropy
from ddgpipe.runtime.launch import run_workers
from tests.runtime_helpers import local_stage_arrays

VOCAB, WIDTH, T = 11, 8, 6


class Embed(nn.Module):
    """ids -> (hidden, padding mask, a float weight per position that needs no gradient)."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)

    def forward(self, ids):
        mask = ids != 0
        return self.tokens(ids), mask, mask.float() * 0.5 + 0.5


class Mix(nn.Module):
    """Takes all three, uses the mask and the weight, passes them on; dropout draws."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(0.2)

    def forward(self, h, mask, weight):
        h = h + self.drop(torch.tanh(self.linear(h))) * weight[..., None]
        return h.masked_fill(~mask[..., None], 0.0), mask, weight


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(WIDTH, VOCAB)

    def forward(self, h, mask, weight):
        return self.out(h)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(Embed(), Mix(), Mix(), Head())


def batches(n):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (4 + i % 2, T), generator=g)  # ragged, zeros are padding
        out.append((ids, torch.randint(1, VOCAB, ids.shape, generator=g)))
    return out


def optimizer(ps):
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9)


def build(stages, stash, executor, **kwargs):
    return ddgpipe.DDG(make_model(), stages, optimizer, stash=stash, executor=executor,
                       threads=1, peer_timeout_s=30, **kwargs)


def feed(pipe, data, rank=0, world=1):
    losses = []
    for x, y in data:
        first, last = rank == 0, rank == world - 1
        loss = pipe.step(x if first else None, y if last else None,
                         token_cross_entropy if last else None)
        losses.append(None if loss is None else loss.item())
    pipe.drain()
    return losses


def reference_run(stages, stash, clocks=6):
    torch.set_num_threads(1)
    pipe = build(stages, stash, "reference")
    return feed(pipe, batches(clocks)), pipe.model.state_dict()


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("stages,stash", [(2, "graph"), (4, "graph"), (2, "recompute"),
                                          (4, "recompute"), (3, "none")])
def test_threads_equal_the_reference_with_three_tensors_between_stages(stages, stash):
    losses, state = reference_run(stages, stash)
    with build(stages, stash, "threads") as pipe:
        assert feed(pipe, batches(6)) == losses
        assert_same_state(pipe.model.state_dict(), state)


def tuple_worker(rank, world, stash, clocks):
    pipe = build(world, stash, None)
    losses = feed(pipe, batches(clocks), rank, world)
    return {"losses": losses, "state": local_stage_arrays(pipe)}  # arrays cross processes


@pytest.mark.parametrize("stages,stash", [
    pytest.param(2, "graph", marks=pytest.mark.slow), (3, "recompute"),
    pytest.param(2, "none", marks=pytest.mark.slow)])
def test_processes_equal_the_reference_with_three_tensors_between_stages(stages, stash):
    results = run_workers(tuple_worker, stages, (stash, 6), timeout_s=120, threads=1)
    losses, state = reference_run(stages, stash)
    assert results[-1]["losses"] == losses
    merged = {k: torch.from_numpy(v) for r in results for k, v in r["state"].items()}
    assert_same_state(merged, state)


@pytest.mark.parametrize("stash", ["graph", "recompute"])
def test_a_checkpoint_with_tuples_in_flight_resumes_bitwise(stash):
    """Stop after 3 clocks (minibatches in flight, as tuples with a bool mask), save through
    torch.save / weights_only load as the checkpoints do, resume in a new pipeline."""
    data = batches(6)
    losses, state = reference_run(3, stash)
    first = build(3, stash, "reference")
    head = [first.step(x, y, token_cross_entropy).item() for x, y in data[:3]]
    buf = io.BytesIO()
    torch.save({"method": first.checkpoint_state(), "rng": torch.get_rng_state()}, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    second = build(3, stash, "reference")
    second.load_checkpoint_state(saved["method"])
    torch.set_rng_state(saved["rng"])
    tail = feed(second, data[3:])
    assert head + tail == losses
    assert_same_state(second.model.state_dict(), state)


def test_integer_ids_flow_through_and_never_require_grad():
    """The first stage gets token ids; only floating tensors are marked for gradients."""
    pipe = build(3, "graph", "reference", split=[1, 2])
    ids, y = batches(1)[0]
    pipe.step(ids, y, token_cross_entropy)
    pending = pipe.stages[1].inflight[0]
    h, mask, weight = pending.inputs
    assert h.requires_grad and not mask.requires_grad and not weight.requires_grad
    assert mask.dtype == torch.bool
    assert pipe.stages[0].inflight[0].grad_shapes == [(tuple(h.shape), torch.float32)]
