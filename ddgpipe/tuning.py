"""Choose the runtime's cut by timing the pipeline: the block profile proposes, the clock decides.

Balancing profiled block times assumes a stage costs the sum of its blocks timed alone. Under
the runtime that is only roughly true: all stages compute at once and share memory bandwidth
and caches, the early stages keep graphs alive across clocks, and the schedule couples
neighbours, so with two stages near balance every op's jitter turns into a wait on the other
side. On the 2-core machine of ``benchmarks/`` the profile cut ResNet-56 (batch 128, K = 2)
at block 10, and the pipeline ran 4-10% faster cut at block 11.

So, with ``balance="pipeline"`` (the runtime's default), every rank runs a few clocks of the
real pipeline on throwaway copies of the model for the profiled cut and for each cut moved by
one block, in interleaved rounds, and all keep the cut with the shortest median clock. The
threaded executor does the same with threads (:func:`fastest_threaded_split`). The weights,
BatchNorm statistics and RNG the training starts from are left untouched.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ddgpipe.layout import Layout
from ddgpipe.partition import partition
from ddgpipe.rng import rng_kept
from ddgpipe.stage import Stage

__all__ = ["candidate_splits", "pipeline_clock_s", "threaded_clock_s", "fastest_split",
           "fastest_threaded_split"]


def candidate_splits(proposed: list[int], blocks: int) -> list[list[int]]:
    """``proposed`` first, then every valid cut that moves one of its points by one block."""
    candidates = [list(proposed)]
    for i in range(len(proposed)):
        for step in (-1, 1):
            cut = list(proposed)
            cut[i] += step
            bounds = [0, *cut, blocks]
            if all(a < b for a, b in zip(bounds, bounds[1:])) and cut not in candidates:
                candidates.append(cut)
    return candidates


def _proxy_loss(out: Tensor, _target: Tensor | None) -> Tensor:
    """Stands in for the real loss: the last stage's backward costs the same whatever it is."""
    return out.float().square().mean()


StageFactory = Callable[[int, int, nn.Module, torch.device], Stage]


def pipeline_clock_s(
    model: nn.Sequential,
    split: list[int],
    make_stage: StageFactory,
    method: str,
    sample_input: Tensor,
    device: torch.device,
    layout: Layout | None = None,
    *,
    clocks: int = 4,
    warmup: int = 2,
    timeout_s: float = 300.0,
) -> float:
    """Seconds per clock of the whole pipeline cut at ``split`` (the same on every rank).

    Runs ``warmup`` + ``clocks`` clocks of this rank's stage, built on a deep copy of
    ``model``; the slowest rank's time counts, since the pipeline goes at its pace. Under
    replicas (``layout``) every replica runs its pipeline, averaging gradients as in training.
    """
    from ddgpipe.distributed import DistributedExecutor

    world = dist.get_world_size()
    layout = layout or Layout.grid(world, 1, dist.get_rank())
    module = partition(copy.deepcopy(model), layout.stages, split=split)[layout.stage]
    stage = make_stage(layout.stage, layout.stages, module, device)
    executor = DistributedExecutor(stage, method=method, timeout_s=timeout_s, layout=layout)
    x = sample_input if stage.is_first else None
    target, loss_fn = (torch.empty(0), _proxy_loss) if stage.is_last else (None, None)
    for _ in range(warmup):
        executor.step(x, target, loss_fn)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(clocks):
        executor.step(x, target, loss_fn)
    elapsed = time.perf_counter() - start
    executor.drain()
    everyone: list[float | None] = [None] * world
    dist.all_gather_object(everyone, elapsed)
    return max(everyone) / clocks


def threaded_clock_s(
    model: nn.Sequential,
    split: list[int],
    make_stage: StageFactory,
    method: str,
    sample_input: Tensor,
    devices: list[torch.device],
    *,
    threads: int,
    clocks: int = 4,
    warmup: int = 2,
    timeout_s: float = 300.0,
) -> float:
    """Seconds per clock of a threaded pipeline cut at ``split``, on a deep copy of ``model``."""
    from ddgpipe.threaded import ThreadedExecutor

    modules = partition(copy.deepcopy(model), len(devices), split=split)
    stages = [make_stage(k, len(modules), m, devices[k]) for k, m in enumerate(modules)]
    executor = ThreadedExecutor(stages, method=method, timeout_s=timeout_s, threads=threads)
    x, target = sample_input, torch.empty(0)
    try:
        for _ in range(warmup):
            executor.step(x, target, _proxy_loss)
        executor.sync()
        start = time.perf_counter()
        for _ in range(clocks):
            executor.step(x, target, _proxy_loss)
        executor.sync()
        elapsed = time.perf_counter() - start
        executor.drain()
    finally:
        executor.close()
    return elapsed / clocks


def _fastest(candidates: list[list[int]], proposed: list[int], clock_s: Callable[[list[int]],
             float], rounds: int) -> tuple[list[int], dict[str, float]]:
    times: dict[str, list[float]] = {_key(c): [] for c in candidates}
    with rng_kept():
        for _ in range(rounds):
            for cut in candidates:
                times[_key(cut)].append(clock_s(cut))
    medians = {k: 1000.0 * statistics.median(v) for k, v in times.items()}
    best = min(candidates, key=lambda c: (medians[_key(c)], c != proposed))
    return best, medians


def fastest_split(
    model: nn.Sequential,
    make_stage: StageFactory,
    method: str,
    sample_input: Tensor,
    proposed: list[int],
    device: torch.device,
    layout: Layout | None = None,
    *,
    rounds: int = 2,
    clocks: int = 4,
    warmup: int = 2,
    timeout_s: float = 300.0,
) -> tuple[list[int], dict[str, float]]:
    """The candidate cut (see :func:`candidate_splits`) whose pipeline clock is shortest.

    Returns ``(split, {cut as "i,j": median milliseconds per clock})``. Candidates are timed
    in ``rounds`` interleaved rounds so a slow minute does not single one out; a tie keeps
    ``proposed``. Every rank gets the same answer (the times are gathered).
    """
    candidates = candidate_splits(proposed, len(model))
    if len(candidates) == 1:
        return list(proposed), {}
    return _fastest(candidates, proposed, lambda cut: pipeline_clock_s(
        model, cut, make_stage, method, sample_input, device, layout, clocks=clocks,
        warmup=warmup, timeout_s=timeout_s), rounds)


def fastest_threaded_split(
    model: nn.Sequential,
    make_stage: StageFactory,
    method: str,
    sample_input: Tensor,
    proposed: list[int],
    devices: list[torch.device],
    *,
    threads: int,
    rounds: int = 2,
    clocks: int = 4,
    warmup: int = 2,
    timeout_s: float = 300.0,
) -> tuple[list[int], dict[str, float]]:
    """:func:`fastest_split` for the threaded executor: candidates timed as thread pipelines."""
    candidates = candidate_splits(proposed, len(model))
    if len(candidates) == 1:
        return list(proposed), {}
    return _fastest(candidates, proposed, lambda cut: threaded_clock_s(
        model, cut, make_stage, method, sample_input, devices, threads=threads, clocks=clocks,
        warmup=warmup, timeout_s=timeout_s), rounds)


def _key(cut: list[int]) -> str:
    return ",".join(map(str, cut))
