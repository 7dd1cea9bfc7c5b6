"""Replicas (DDG x data parallelism): K stages x R replicas, K x R processes.

The oracle: with mean losses, R replicas each fed 1/R of a minibatch and averaging their
gradients take the very step one pipeline fed the whole minibatch takes — in float64 the
weights agree to 1e-12. With BatchNorm (per-replica batch statistics) the replicas of a stage
stay bitwise identical, and their running statistics agree once averaged.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddgpipe
from ddgpipe.core.stage import Stage
from ddgpipe.errors import UsageError, WorkerError
from ddgpipe.runtime.launch import run_workers
from ddgpipe.runtime.layout import Layout, check_world
from tests.helpers import batches

CLOCKS = 6


# --- the layout, without processes ----------------------------------------------------------

def test_the_layout_of_two_stages_by_two_replicas():
    where = {}
    for rank in range(4):
        layout = Layout.grid(2, 2, rank)
        where[rank] = (layout.replica, layout.stage, layout.prev_rank, layout.next_rank,
                       layout.data_ranks)
    assert where == {0: (0, 0, None, 1, [0, 2]), 1: (0, 1, 0, None, [1, 3]),
                     2: (1, 0, None, 3, [0, 2]), 3: (1, 1, 2, None, [1, 3])}
    assert Layout.grid(2, 2, 3).last_rank == 3
    assert [Layout.grid(3, 2, r).writes_stage_state for r in range(6)] == [True] * 3 + [False] * 3


def test_shards_split_the_global_batch_in_order():
    batch = torch.arange(12)
    shards = [Layout.grid(2, 3, r * 2).shard(batch) for r in range(3)]
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert Layout.grid(2, 1, 0).shard(batch) is batch
    with pytest.raises(UsageError, match="13 samples cannot be split into 3 equal shards"):
        Layout.grid(1, 3, 0).shard(torch.arange(13))


def test_a_wrong_world_size_names_both_numbers_and_the_fix():
    with pytest.raises(UsageError, match=r"6 processes but 2 stages x 2 replicas = 4: .*launch "
                                         r"4 processes.*--stages 3.*--replicas 3"):
        check_world(6, 2, 2)
    with pytest.raises(UsageError, match="2 processes but 3 stages"):
        check_world(2, 3, 1)
    check_world(4, 2, 2)


class _OverflowElsewhere:
    """Stands in for the gradient average when another replica's gradients overflowed: the
    sum, hence the average, holds an inf."""

    def watching(self, leaves):
        return nullcontext()

    def wait(self):
        self.stage.module.weight.grad[0, 0] = math.inf


def test_an_overflow_in_another_replica_skips_the_step_here():
    """fp16 unscaling and the overflow check run at S, after the average: a replica whose own
    gradients are finite skips the step too, and reports the overflow forward."""
    torch.manual_seed(0)
    stage = Stage(1, 2, nn.Linear(4, 2), lambda ps: torch.optim.SGD(ps, lr=0.1),
                  precision="fp16")
    stage.averager = _OverflowElsewhere()
    stage.averager.stage = stage
    before = stage.module.weight.detach().clone()
    stage.forward_loss(0, torch.randn(4, 4), torch.zeros(4, dtype=torch.long), F.cross_entropy)
    stage.backward(0)
    assert torch.isfinite(stage.module.weight.grad).all()  # its own gradient is fine
    stage.step(0)
    assert stage.overflow_skips == 1 and stage.take_overflow()
    assert torch.equal(stage.module.weight.detach(), before)


@pytest.mark.parametrize("stash", ["graph", "recompute"])
def test_each_bucket_starts_its_average_during_the_backward(stash, tmp_path, monkeypatch):
    """The all-reduce of a bucket is launched from the backward, by the hook on the leaves
    the backward writes into, not after it: one rank's group is enough to see it."""
    import torch.distributed as dist

    from ddgpipe.runtime.replicas import GradientAverager

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                               nn.Linear(8, 3))
        stage = Stage(0, 2, module, lambda ps: torch.optim.SGD(ps, lr=0.1), stash=stash)
        stage.averager = GradientAverager(stage.stash.params, dist.group.WORLD, 1,
                                          bucket_bytes=64)  # one bucket per parameter
        launched_in_backward = []
        launch = stage.averager._launch

        def recording(bucket):
            launched_in_backward.append(torch._C._current_graph_task_id() != -1)
            launch(bucket)

        monkeypatch.setattr(stage.averager, "_launch", recording)
        stage.forward(0, torch.randn(5, 4))
        before = {n: p.detach().clone() for n, p in stage.stash.params.items()}
        stage.backward(0, torch.ones(5, 3))
        assert launched_in_backward == [True] * len(stage.stash.params)
        grads = {n: p.grad.clone() for n, p in stage.stash.params.items()}
        stage.step(0)  # R = 1: the average is the gradient itself
        for name, p in stage.stash.params.items():
            assert torch.allclose(p.detach(), before[name] - 0.1 * grads[name], atol=1e-7), name
    finally:
        dist.destroy_process_group()


# --- the oracle and replica agreement, in K x R processes -------------------------------------

def _mlp64() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.Tanh()),
                         nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
                         nn.Linear(8, 3)).double()


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Dropout(0.2)),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))


MODELS = {"mlp64": _mlp64, "bn": _bn_net}


def _batches(model: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if model == "mlp64":
        return batches(CLOCKS, (6,), classes=3, dtype=torch.float64)
    return batches(CLOCKS, (1, 6, 6), classes=3, dtype=torch.float32)


def _build(model: str, stash: str, replicas: int, **kwargs) -> ddgpipe.DDG:
    return ddgpipe.DDG(
        MODELS[model](), 2,
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5),
        stash=stash, split=[1], replicas=replicas, peer_timeout_s=30, **kwargs)


def _arrays(module: nn.Module) -> dict:
    """As numpy arrays: tensors would travel back from a worker through shared memory that
    dies with it."""
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _tensors(arrays: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def replica_worker(rank: int, world: int, cases: list[tuple[str, str]]) -> dict:
    """Every case on this rank: every rank feeds the whole global minibatch."""
    out = {}
    for model, stash in cases:
        pipe = _build(model, stash, replicas=2)
        losses = []
        for i, (x, y) in enumerate(_batches(model)):
            losses.append(pipe.step(x, y, F.cross_entropy))
            if i == 2:  # the statistics agree while graphs are in flight (as at a checkpoint)
                pipe.sync()
        pipe.drain()
        trained = _arrays(pipe.stages[0].module)  # before the replicas' statistics agree
        pipe.eval()
        out[(model, stash)] = {
            "stage": pipe.executor.layout.stage, "replica": pipe.executor.layout.replica,
            "trained": trained, "agreed": _arrays(pipe.stages[0].module),
            "losses": [None if loss is None else loss.item() for loss in losses]}
    return out


CASES = [("mlp64", "graph"), ("mlp64", "recompute"), ("bn", "graph"), ("bn", "recompute")]


@pytest.fixture(scope="module")
def two_by_two():
    """K = 2 stages x R = 2 replicas, every case in the same four processes."""
    return run_workers(replica_worker, 4, (CASES,), timeout_s=150, threads=1)


@pytest.mark.parametrize("stash", ["graph", "recompute"])  # one 2 x 2 run, shared
def test_two_replicas_equal_one_pipeline_on_the_whole_batch_in_float64(two_by_two, stash):
    reference = _build("mlp64", stash, replicas=1, executor="reference")
    losses = [reference.step(x, y, F.cross_entropy).item() for x, y in _batches("mlp64")]
    reference.drain()
    initial = _mlp64().state_dict()
    for result in (r[("mlp64", stash)] for r in two_by_two):
        stage = reference.stages[result["stage"]]
        trained = _tensors(result["trained"])
        for name, value in stage.module.state_dict().items():
            assert torch.allclose(trained[name], value, rtol=0, atol=1e-12), name
            assert not torch.equal(value, initial[name]), "the weights never moved"
        if stage.is_last:  # the mean of the shards' losses: the whole minibatch's loss
            assert result["losses"] == pytest.approx(losses, rel=0, abs=1e-12)


@pytest.mark.parametrize("stash", ["graph", "recompute"])
def test_replicas_with_batchnorm_stay_identical(two_by_two, stash):
    by_place = {}
    for result in (r[("bn", stash)] for r in two_by_two):
        by_place[(result["stage"], result["replica"])] = {
            "trained": _tensors(result["trained"]), "agreed": _tensors(result["agreed"]),
            "losses": result["losses"]}
    for k in range(2):
        a, b = by_place[(k, 0)], by_place[(k, 1)]
        stats = {n for n in a["trained"] if "running" in n}
        for name, value in a["trained"].items():
            if name in stats:  # per-replica batch statistics: different shards, different EMA
                assert not torch.equal(value, b["trained"][name]), name
                mean = (value + b["trained"][name]) / 2
                assert torch.equal(a["agreed"][name], mean), name
            else:  # the weights (and the batch counter): bitwise the same
                assert torch.equal(value, b["trained"][name]), name
            assert torch.equal(a["agreed"][name], b["agreed"][name]), name
    last = [by_place[(1, r)]["losses"] for r in range(2)]
    assert last[0] == last[1] and all(math.isfinite(v) for v in last[0])


# --- failures -------------------------------------------------------------------------------

def dying_worker(rank: int, world: int) -> str:
    pipe = _build("bn", "graph", replicas=2)
    for i, (x, y) in enumerate(_batches("bn") * 20):
        if rank == 2 and i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        pipe.step(x, y, F.cross_entropy)
        time.sleep(0.01)
    pipe.drain()
    return "finished"


@pytest.mark.slow
def test_a_killed_replica_stops_every_process_and_is_named():
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        run_workers(dying_worker, 4, timeout_s=60, peer_timeout_s=20, threads=1)
    assert info.value.rank == 2 and "SIGKILL" in str(info.value)
    assert time.monotonic() - start < 30
    assert mp.active_children() == []


def wrong_world_worker(rank: int, world: int) -> None:
    _build("bn", "graph", replicas=2)


@pytest.mark.slow
def test_the_world_must_be_stages_times_replicas():
    with pytest.raises(UsageError, match="3 processes but 2 stages x 2 replicas = 4"):
        run_workers(wrong_world_worker, 3, timeout_s=60, threads=1)
