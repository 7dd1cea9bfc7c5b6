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
from ddgpipe.partition import cut_points, partition
from ddgpipe.stage import Stage
from ddgpipe.timeline import Timeline

__all__ = ["world_size", "build_stages"]


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
        balance = "time" if world > 1 and sample_input is not None else "params"
    if world == 1:
        modules = partition(model, stages, split=split, balance=balance, sample_input=sample_input)
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
    # Every rank must cut at the same places; a profiled split is measured on rank 0 only.
    boundaries = [split]
    if rank == 0 and split is None:
        boundaries = [cut_points(partition(model, stages, balance=balance,
                                           sample_input=sample_input))]
    dist.broadcast_object_list(boundaries, src=0)
    modules = partition(model, stages, split=boundaries[0] or None, balance="params")
    stage = make_stage(rank, stages, modules[rank])
    executor = DistributedExecutor(stage, method=method, timeline=timeline,
                                   timeout_s=peer_timeout_s)
    executor.split = cut_points(modules)
    return [stage], executor
