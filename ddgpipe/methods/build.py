"""Cut a model into stages and pick the executor: all stages here, or this rank's one only.

Under torch.distributed (torchrun, or ``--launcher local``) with one process per stage, each
rank builds only its own stage and a :class:`DistributedExecutor`; otherwise every stage lives
in this process and the :class:`LocalExecutor` runs them. Both walk the same schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor, nn

from ddgpipe.errors import UsageError
from ddgpipe.local import LocalExecutor
from ddgpipe.partition import balanced_split, block_costs, check_model, cut_points, partition
from ddgpipe.stage import Stage
from ddgpipe.timeline import Timeline
from ddgpipe.tuning import fastest_split

__all__ = ["BUILD_BALANCE_MODES", "world_size", "build_stages", "agreed_split"]

BUILD_BALANCE_MODES = ("params", "time", "pipeline")
"""``pipeline``: the profiled cut and its neighbours timed as real pipelines (see tuning.py)."""


def world_size() -> int:
    """Processes in the default group, or 1 when torch.distributed is not in use."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def build_stages(
    model: nn.Module,
    stages: int,
    make_stage: Callable[[int, int, nn.Module], Stage],
    method: str,
    *,
    split: list[int] | None,
    balance: str | None,
    sample_input: Tensor | None,
    timeline: Timeline | None,
    peer_timeout_s: float = 300.0,
):
    """Return ``(stage_list, executor)`` for this process."""
    world = world_size()
    if balance is None:  # the runtime's speed is its slowest stage's time; a simulation's is not
        balance = "pipeline" if world > 1 and sample_input is not None else "params"
    if balance not in BUILD_BALANCE_MODES:
        raise UsageError(f"unknown balance {balance!r}; choose one of "
                         f"{', '.join(BUILD_BALANCE_MODES)}")
    # "pipeline" starts from the profiled cut; one process has no pipeline clock to time.
    profiled = "time" if balance == "pipeline" else balance
    if world == 1:
        modules = partition(model, stages, split=split, balance=profiled,
                            sample_input=sample_input)
        stage_list = [make_stage(k, len(modules), m) for k, m in enumerate(modules)]
        executor = LocalExecutor(stage_list, method=method, timeline=timeline)
        executor.split = cut_points(modules)
        return stage_list, executor

    from ddgpipe.distributed import DistributedExecutor

    if world != stages:
        raise UsageError(
            f"{world} processes but {stages} stages: the runtime runs one stage per process; "
            f"launch {stages} processes (torchrun --nproc-per-node {stages}) or pass "
            f"--stages {world}"
        )
    rank = dist.get_rank()
    tuning = None
    if split is None:
        split = agreed_split(model, stages, profiled, sample_input)
        if balance == "pipeline":
            proposed = split
            split, clock_ms = fastest_split(model, make_stage, method, sample_input, proposed,
                                            timeout_s=peer_timeout_s)
            tuning = {"profiled_split": proposed, "clock_ms": clock_ms}
    modules = partition(model, stages, split=split)
    stage = make_stage(rank, stages, modules[rank])
    executor = DistributedExecutor(stage, method=method, timeline=timeline,
                                   timeout_s=peer_timeout_s)
    executor.split = cut_points(modules)
    executor.split_tuning = tuning
    return [stage], executor


def agreed_split(model: nn.Module, stages: int, balance: str,
                 sample_input: Tensor | None) -> list[int]:
    """The cut every rank of the process group uses when none is given.

    Every rank measures the block costs *at the same time* and all cut on the mean. A profile
    taken on one rank while the others sit idle times the blocks on a quiet machine, but the
    run has every stage computing at once, sharing memory bandwidth and caches, and the
    memory-bound blocks (the early, wide activations) slow down more than the others: on
    the 2-core machine of ``benchmarks/`` the quiet profile put ResNet-56's cut one block too
    early. Averaging also gives identical costs, hence the same cut, on every rank.
    """
    check_model(model, stages)
    costs = block_costs(model, balance, sample_input)
    gathered: list[list[float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, costs)
    mean = [sum(c) / len(gathered) for c in zip(*gathered, strict=True)]
    return balanced_split(mean, stages)
