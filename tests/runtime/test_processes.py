"""The parallel runtime against the reference executor: bitwise, and failures that never hang.

Workers run over gloo on 127.0.0.1 with a free port, one thread each, and are always reaped
by ``run_workers`` (which also bounds every test in time).
"""

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F

import ddgpipe
from ddgpipe.methods.dni import DNI
from ddgpipe.methods.microbatches import split_minibatch
from ddgpipe.runtime.launch import WorkerError, run_workers
from tests.helpers import batches, dropout_convnet, ragged_batches, sgd, step_lr
from tests.runtime_helpers import (
    assert_runtime_matches_reference,
    local_stage_arrays,
    run_clocks,
)

SLOW = pytest.mark.slow  # every test here spawns processes; one case of each guarantee is quick


def build(method, stages, stash, executor=None):
    model = dropout_convnet()
    if method == "dni":
        return DNI(model, stages, sgd(), lr_scheduler=step_lr(), peer_timeout_s=30,
                   executor=executor)
    return ddgpipe.DDG(model, stages, sgd(), lr_scheduler=step_lr(), stash=stash,
                       peer_timeout_s=30, executor=executor)


def stage_worker(rank, world, method, stash, clocks):
    torch.manual_seed(1234)  # must not matter: models are built from their own seed
    pipe = build(method, world, stash)
    losses = run_clocks(pipe, rank, world, ragged_batches(clocks))
    state = local_stage_arrays(pipe)
    return {"state": state, "losses": losses}


@pytest.mark.parametrize("method,stages,stash", [
    pytest.param("ddg", 2, "graph", marks=SLOW), pytest.param("ddg", 2, "recompute", marks=SLOW),
    ("ddg", 3, "graph"), pytest.param("ddg", 3, "recompute", marks=SLOW),
    ("dni", 2, None), pytest.param("dni", 3, None, marks=SLOW),
])
def test_runtime_matches_reference_bitwise(method, stages, stash):
    clocks = 7
    results = run_workers(stage_worker, stages, (method, stash, clocks), timeout_s=120,
                          threads=1)
    assert_runtime_matches_reference(results, lambda: build(method, stages, stash, "reference"),
                                     ragged_batches(clocks))


def microbatched(stages, stash, executor=None):
    return ddgpipe.DDG(dropout_convnet(), stages, sgd(), lr_scheduler=step_lr(), stash=stash,
                       peer_timeout_s=30, executor=executor, microbatches=2)


def microbatched_worker(rank, world, stash, minibatches):
    pipe = microbatched(world, stash)
    losses = run_clocks(pipe, rank, world, batches(minibatches, sizes=(8, 6, 4)))
    return {"state": local_stage_arrays(pipe), "losses": losses}


@pytest.mark.parametrize("stages,stash", [pytest.param(2, "graph", marks=SLOW), (3, "recompute")])
def test_runtime_matches_reference_bitwise_with_microbatches(stages, stash):
    """Microbatched DDG (M = 2): every rank's weights and the losses agree with the reference."""
    minibatches = 5
    results = run_workers(microbatched_worker, stages, (stash, minibatches), timeout_s=120,
                          threads=1)
    assert_runtime_matches_reference(results, lambda: microbatched(stages, stash, "reference"),
                                     batches(minibatches, sizes=(8, 6, 4)))


def mid_step_worker(rank, world, microbatches_fed):
    pipe = microbatched(world, "graph")
    micro = [part for x, y in batches(3, sizes=8) for part in split_minibatch(x, y, 2)]
    first, last = rank == 0, rank == world - 1
    for x, y in micro[:microbatches_fed]:
        pipe.executor.step(x if first else None, y if last else None,
                           F.cross_entropy if last else None)
    summed = pipe.checkpoint_state()["shared"].get("gradient_sum")
    pipe.close()
    return {k: v.numpy() if hasattr(v, "numpy") else v for k, v in summed["sums"].items()} \
        | {"count": summed["count"]}


@SLOW
def test_a_mid_step_checkpoint_holds_the_references_gradient_sums():
    """Between two clocks of a step each rank's checkpoint holds the gradients its stage
    summed so far, bitwise the reference's (loading them is the stage's own code)."""
    results = run_workers(mid_step_worker, 2, (3,), timeout_s=120, threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker computed
    try:
        reference = microbatched(2, "graph", "reference")
        micro = [part for x, y in batches(3, sizes=8) for part in split_minibatch(x, y, 2)]
        for x, y in micro[:3]:
            reference.executor.step(x, y, F.cross_entropy)
        stages = reference.checkpoint_state()["stages"]
    finally:
        torch.set_num_threads(threads)
    for result, stage in zip(results, stages, strict=True):
        expected = stage["gradient_sum"]
        assert result["count"] == expected["count"] == 1
        for name, value in expected["sums"].items():
            assert torch.equal(torch.from_numpy(result[name]), value), name


def failing_worker(rank, world, how):
    pipe = build("ddg", world, "graph")
    for i, (x, y) in enumerate(ragged_batches(50)):
        if rank == 1 and i == 3:
            if how == "raise":
                raise RuntimeError("injected failure in stage 1")
            os.kill(os.getpid(), signal.SIGKILL)
        pipe.step(x, y, F.cross_entropy)
        time.sleep(0.01)
    pipe.drain()
    return "finished"


@pytest.mark.parametrize("how,expected", [
    pytest.param("raise", "injected failure", marks=SLOW), ("kill", "SIGKILL")])
def test_a_dead_stage_stops_every_worker(how, expected):
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        run_workers(failing_worker, 3, (how,), timeout_s=60, peer_timeout_s=20, threads=1)
    assert info.value.rank == 1 and expected in str(info.value)
    assert time.monotonic() - start < 30
    assert mp.active_children() == []


def nan_worker(rank, world):
    pipe = build("ddg", world, "graph")
    for i, (x, y) in enumerate(ragged_batches(10)):
        if i == 4:
            x = x * float("nan")
        pipe.step(x, y, F.cross_entropy)
    return "finished"


def test_nan_loss_stops_all_stages_with_a_clear_message():
    with pytest.raises(ddgpipe.UsageError, match="loss is nan at minibatch 4"):
        run_workers(nan_worker, 2, timeout_s=60, peer_timeout_s=20, threads=1)
    assert mp.active_children() == []


def wrong_world_worker(rank, world):
    build("ddg", 3, "graph")


@SLOW
def test_stage_count_must_match_processes():
    with pytest.raises(ddgpipe.UsageError, match="2 processes but 3 stages"):
        run_workers(wrong_world_worker, 2, timeout_s=60, threads=1)
