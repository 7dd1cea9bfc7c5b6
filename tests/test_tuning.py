"""Choosing the runtime's cut by timing real pipelines: the candidates, agreement between
ranks, and that the timing runs leave the training bitwise what it would have been."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddgpipe
from ddgpipe.launch import run_workers
from ddgpipe.methods.dni import DNI
from ddgpipe.tuning import candidate_splits


def test_candidates_move_one_cut_by_one_block_and_stay_valid():
    assert candidate_splits([4], 8) == [[4], [3], [5]]
    assert candidate_splits([1], 3) == [[1], [2]]  # [0] would leave stage 0 empty
    assert candidate_splits([2, 3], 5) == [[2, 3], [1, 3], [2, 4]]  # [3, 3], [2, 2] are not cuts
    assert candidate_splits([1], 2) == [[1]]


def make_model():
    """Dropout in several stages makes the RNG matter, BatchNorm the running statistics."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Dropout(0.1)),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Dropout(0.3), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(16, 10)),
    )


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def optimizer(ps):
    return torch.optim.SGD(ps, lr=0.05, momentum=0.9)


def build(method, stages, **kwargs):
    model = make_model()
    torch.manual_seed(7)  # the RNG the training starts from; the tuning must leave it so
    if method == "dni":
        return DNI(model, stages, optimizer, peer_timeout_s=30, **kwargs)
    return ddgpipe.DDG(model, stages, optimizer, peer_timeout_s=30, **kwargs)


def train(pipe, rank, world, clocks):
    losses = []
    for x, y in batches(clocks):
        first, last = rank == 0, rank == world - 1
        loss = pipe.step(x if first else None, y if last else None,
                         F.cross_entropy if last else None)
        losses.append(None if loss is None else loss.item())
    pipe.drain()
    return losses


def tuned_worker(rank, world, method, clocks):
    pipe = build(method, world, balance="pipeline", sample_input=batches(1)[0][0])
    losses = train(pipe, rank, world, clocks)
    state = {k: v.numpy().copy() for k, v in pipe.stages[0].module.state_dict().items()}
    return {"split": pipe.executor.split, "tuning": pipe.executor.split_tuning,
            "losses": losses, "state": state}


@pytest.mark.parametrize("method,stages", [("ddg", 2), ("ddg", 3), ("dni", 2)])
def test_tuned_cut_is_agreed_and_training_matches_the_reference_bitwise(method, stages):
    clocks = 6
    results = run_workers(tuned_worker, stages, (method, clocks), timeout_s=120, threads=1)
    split = results[0]["split"]
    assert all(r["split"] == split for r in results)
    tuning = results[0]["tuning"]
    assert all(r["tuning"] == tuning for r in results)
    timed = {tuple(int(i) for i in k.split(",")): ms for k, ms in tuning["clock_ms"].items()}
    assert tuple(tuning["profiled_split"]) in timed and tuple(split) in timed
    assert timed[tuple(split)] == min(timed.values())
    assert all(ms > 0 for ms in timed.values())

    torch.set_num_threads(1)
    try:
        reference = build(method, stages, split=split)
        losses = train(reference, 0, 1, clocks)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert results[-1]["losses"] == losses
    for stage, result in zip(reference.stages, results):
        for name, value in stage.module.state_dict().items():
            assert torch.equal(value, torch.from_numpy(result["state"][name])), name
