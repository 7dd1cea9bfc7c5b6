"""Cut a model into stages, put each on its device, and build the executor that runs them.

``reference`` and ``threads`` build every stage here; under ``processes`` each rank builds
only its own (one stage per rank, K x R ranks with replicas, see
:mod:`ddgpipe.runtime.layout`). Without a hand-given cut, a pipeline fed a sample input is
cut where this machine ran it fastest: the timed cut remembered for this model, schedule,
executor and layout (:mod:`ddgpipe.balance.cutcache`), or a new timing of the profiled cut
and its neighbours (:mod:`ddgpipe.balance.timed`) run as real pipelines of the executor's
kind. The in-process executors share the threads' cut, so the reference gives the threaded
executor's numbers.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ddgpipe.balance.cutcache import cached_cut, cut_key, remember_cut
from ddgpipe.balance.partition import (
    as_blocks,
    balanced_split,
    block_costs,
    check_model,
    cut_points,
    partition,
)
from ddgpipe.balance.timed import Timing, fastest_cut
from ddgpipe.core.stage import StageFactory
from ddgpipe.core.timeline import Timeline
from ddgpipe.errors import UsageError
from ddgpipe.runtime.devices import cores_per_stage, rank_device, stage_devices
from ddgpipe.runtime.executor import Executor
from ddgpipe.runtime.layout import process_layout
from ddgpipe.runtime.placement import Placement, choose_executor
from ddgpipe.runtime.processes import ProcessExecutor
from ddgpipe.runtime.reference import ReferenceExecutor
from ddgpipe.runtime.threads import ThreadedExecutor

__all__ = ["build_stages", "agreed_split", "clock_seconds"]


def build_stages(model: nn.Module, stages: int, make_stage: StageFactory, method: str,
                 placement: Placement, *, sample_input: Tensor | None = None,
                 timeline: Timeline | None = None,
                 schedule: tuple[str, str] = ("graph", "fp32")) -> Executor:
    """The executor that runs this process's stages of ``model`` cut into ``stages``.

    ``schedule`` (stash mode, precision) is part of what a remembered timed cut depends on.
    """
    placement.check()
    kind = choose_executor(placement.executor, stages, placement.replicas)
    blocks = as_blocks(model, stages)
    remembered = placement.balance is None and sample_input is not None and stages > 1
    balance = placement.balance or ("pipeline" if remembered else "params")
    profiled = "time" if balance == "pipeline" else balance  # pipeline starts from it
    if kind == "processes":
        return _rank_pipeline(blocks, stages, make_stage, method, placement, balance, profiled,
                              remembered, sample_input, timeline, schedule)
    devices = stage_devices(stages, placement.device, placement.devices)
    threads = placement.threads or cores_per_stage(stages)

    def threaded(of: nn.Sequential, cut: list[int], record: Timeline | None) -> ThreadedExecutor:
        modules = partition(of, stages, split=cut)
        return ThreadedExecutor([make_stage(k, stages, m, devices[k])
                                 for k, m in enumerate(modules)], method=method,
                                timeline=record, timeout_s=placement.peer_timeout_s,
                                threads=threads)

    split = None if placement.split is None else list(placement.split)
    tuning = None
    if split is None and balance == "pipeline" and stages > 1:
        sample = _needs_sample(sample_input)
        key = cut_key(blocks, sample, stages, method, *schedule, "threads",
                      [str(d) for d in devices], threads)
        tuning = cached_cut(key) if remembered else None
        if tuning is None:
            proposed = cut_points(partition(blocks, stages, balance=profiled,
                                            sample_input=sample))
            tuning = _time_cuts(blocks, proposed, sample, lambda cut, record: threaded(
                copy.deepcopy(blocks), cut, record))
            remember_cut(key, tuning)
        split = tuning["split"]
    if split is None:
        split = cut_points(partition(blocks, stages, balance=profiled, sample_input=sample_input))
    if kind == "threads":
        executor: Executor = threaded(blocks, split, timeline)
    else:
        modules = partition(blocks, stages, split=split)
        executor = ReferenceExecutor([make_stage(k, stages, m, devices[k])
                                      for k, m in enumerate(modules)], method=method,
                                     timeline=timeline)
    executor.split, executor.split_tuning = split, tuning
    return executor


def _rank_pipeline(model: nn.Sequential, stages: int, make_stage: StageFactory, method: str,
                   placement: Placement, balance: str, profiled: str, remembered: bool,
                   sample_input: Tensor | None, timeline: Timeline | None,
                   schedule: tuple[str, str]) -> Executor:
    """This rank's stage of the pipeline, under the process runtime."""
    replicas = placement.replicas
    if method != "ddg" and replicas > 1:
        raise UsageError(f"replicas average delayed gradients between B and S of DDG; {method} "
                         "runs one pipeline only: drop --replicas")
    here = rank_device(placement.device, placement.devices)
    layout = process_layout(stages, replicas, here.type, placement.comm)  # world = K x R

    def rank_stage(of: nn.Sequential, cut: list[int],
                   record: Timeline | None) -> ProcessExecutor:
        module = partition(of, stages, split=cut)[layout.stage]
        return ProcessExecutor(make_stage(layout.stage, stages, module, here), method=method,
                               timeline=record, timeout_s=placement.peer_timeout_s,
                               comm=placement.comm, layout=layout)

    split = None if placement.split is None else list(placement.split)
    tuning = None
    if split is None and balance == "pipeline":
        sample = _needs_sample(sample_input)
        key = cut_key(model, sample, stages, method, *schedule, "processes",
                      [here.type] * (stages * replicas), torch.get_num_threads())
        # rank 0's memory decides, so every rank (every node) uses the same cut
        shared = [cached_cut(key) if remembered and layout.rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        tuning = shared[0]
        if tuning is None:
            proposed = agreed_split(model, stages, profiled, sample)
            tuning = _time_cuts(model, proposed, sample,
                                lambda cut, record: rank_stage(copy.deepcopy(model), cut, record))
            if layout.rank == 0:
                remember_cut(key, tuning)
        split = tuning["split"]
    elif split is None:
        split = agreed_split(model, stages, profiled, sample_input)
    executor = rank_stage(model, split, timeline)
    executor.split, executor.split_tuning = split, tuning
    return executor


def _needs_sample(sample_input: Tensor | None) -> Tensor:
    if sample_input is None:
        raise UsageError('balance="pipeline" runs the pipeline on a sample batch and needs a '
                         "sample_input")
    return sample_input


def _time_cuts(model: nn.Sequential, proposed: list[int], sample_input: Tensor,
               build: Callable[[list[int], Timeline], Executor]) -> dict:
    """Time the proposed cut and its neighbours as pipelines ``build`` makes (recording a
    timeline of their ops); the choice and every candidate's timings."""
    def time_cut(cut: list[int]) -> Timing:
        record = Timeline(max_minibatches=None)
        return clock_seconds(build(cut, record), sample_input, record)

    split, timings = fastest_cut(proposed, len(model), time_cut)
    return {"split": split, "profiled_split": proposed, **timings}


def _proxy_loss(out: Tensor, _target: Tensor | None) -> Tensor:
    """Stands in for the real loss: the last stage's backward costs the same whatever it is."""
    return out.float().square().mean()


def clock_seconds(executor: Executor, sample_input: Tensor,
                  timeline: Timeline | None = None, *, clocks: int = 4,
                  warmup: int = 2) -> Timing:
    """Seconds per clock of the pipeline ``executor`` runs (the slowest rank's), measured over
    ``clocks`` clocks after ``warmup``, and, from ``timeline`` (the executor's), each stage's
    seconds of compute per clock; the executor is drained and closed after."""
    x, target = sample_input, torch.empty(0)
    try:
        for _ in range(warmup):
            executor.step(x, target, _proxy_loss)
        executor.sync()
        executor.barrier()
        start = time.perf_counter()
        for _ in range(clocks):
            executor.step(x, target, _proxy_loss)
        executor.sync()
        end = time.perf_counter()
        executor.drain()
    finally:
        executor.close()
    busy = {s.index: timeline.busy_s(s.index, start, end) / clocks
            for s in executor.stages} if timeline is not None else {}
    gathered = executor.gather((end - start, busy))
    per_stage: dict[int, float] = {}
    for _, found in gathered:  # replicas of a stage: the slowest copy
        for k, seconds in found.items():
            per_stage[k] = max(per_stage.get(k, 0.0), seconds)
    return max(e for e, _ in gathered) / clocks, [per_stage[k] for k in sorted(per_stage)]


def agreed_split(model: nn.Sequential, stages: int, balance: str,
                 sample_input: Tensor | None) -> list[int]:
    """The cut every rank of the process group uses when none is given: every rank measures
    the block costs at the same time, and all cut on the mean (why: ``docs/design.md``)."""
    check_model(model, stages)
    costs = block_costs(model, balance, sample_input)
    gathered: list[list[float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, costs)
    mean = [sum(c) / len(gathered) for c in zip(*gathered, strict=True)]
    return balanced_split(mean, stages)

