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
    choose_split,
    partition,
)
from ddgpipe.balance.timed import Timing, fastest_cut
from ddgpipe.core.schedule import Schedule
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
from ddgpipe.runtime.ties import RankTies, SharedTies, copy_tied, tie_groups

__all__ = ["build_stages", "choose_cut", "agreed_split", "clock_seconds"]


def build_stages(model: nn.Module, schedule: Schedule, make_stage: StageFactory,
                 placement: Placement, *, sample_input: Tensor | None = None,
                 timeline: Timeline | None = None,
                 stash_precision: tuple[str, str] = ("graph", "fp32")) -> Executor:
    """The executor that runs this process's stages of ``model``, cut into
    ``schedule.stages`` and placed as ``placement`` (checked by the caller) says.

    ``stash_precision`` is part of what a remembered timed cut depends on.
    """
    kind = choose_executor(placement.executor, schedule.stages, placement.replicas)
    blocks = as_blocks(model, schedule.stages)
    side: _Side = _Ranks(schedule, make_stage, placement) if kind == "processes" else \
        _InProcess(kind, schedule, make_stage, placement)
    split, tuning = choose_cut(blocks, schedule, placement, side, sample_input, stash_precision)
    return side.build(blocks, split, timeline, tuning)


def choose_cut(blocks: nn.Sequential, schedule: Schedule, placement: Placement, side: _Side,
               sample_input: Tensor | None,
               stash_precision: tuple[str, str]) -> tuple[list[int], dict | None]:
    """The cut points, and how they were chosen (the timed candidates, when timed): the
    placement's split, else the remembered or newly timed cut, else the balanced one."""
    if placement.split is not None:
        return list(placement.split), None
    stages = schedule.stages
    remembered = placement.balance is None and sample_input is not None and stages > 1
    balance = placement.balance or ("pipeline" if remembered else "params")
    profiled = "time" if balance == "pipeline" else balance  # pipeline starts from it
    if balance != "pipeline" or not side.times_cuts:
        return side.propose(blocks, profiled, sample_input), None
    sample = _needs_sample(sample_input)
    stash, precision = stash_precision
    executor, devices, threads = side.where()
    key = cut_key(blocks, sample, schedule, stash, precision, executor, devices, threads)
    tuning = side.recall(key if remembered else None)
    if tuning is None:
        proposed = side.propose(blocks, profiled, sample)
        tuning = _time_cuts(blocks, proposed, sample, lambda cut, record: side.build_timed(
            copy.deepcopy(blocks), cut, record))
        side.remember(key, tuning)
    return tuning["split"], tuning


class _Side:
    """Where this process's stages are built: every stage here, or this rank's only."""

    #: whether ``balance="pipeline"`` times candidate cuts (else it cuts by profiled time)
    times_cuts = True

    def where(self) -> tuple[str, list[str], int]:
        """The executor, devices and threads a remembered cut is kept for."""
        raise NotImplementedError

    def propose(self, blocks: nn.Sequential, balance: str,
                sample_input: Tensor | None) -> list[int]:
        raise NotImplementedError

    def recall(self, key: str | None) -> dict | None:
        """The cut remembered for ``key`` (None: look none up)."""
        raise NotImplementedError

    def remember(self, key: str, tuning: dict) -> None:
        raise NotImplementedError

    def build_timed(self, blocks: nn.Sequential, cut: list[int],
                    record: Timeline) -> Executor:
        """A pipeline of ``cut`` to time, recording its ops in ``record``."""
        raise NotImplementedError

    def build(self, blocks: nn.Sequential, cut: list[int], timeline: Timeline | None,
              tuning: dict | None) -> Executor:
        raise NotImplementedError


class _InProcess(_Side):
    """Every stage in this process (reference, threads); both use the threads' timed cut,
    so the reference gives the threaded executor's numbers."""

    def __init__(self, kind: str, schedule: Schedule, make_stage: StageFactory,
                 placement: Placement):
        self.kind, self.schedule, self.make_stage = kind, schedule, make_stage
        self.placement = placement
        self.devices = stage_devices(schedule.stages, placement.device, placement.devices)
        self.threads = placement.threads or cores_per_stage(schedule.stages)
        self.times_cuts = schedule.stages > 1

    def where(self) -> tuple[str, list[str], int]:
        return "threads", [str(d) for d in self.devices], self.threads

    def propose(self, blocks: nn.Sequential, balance: str,
                sample_input: Tensor | None) -> list[int]:
        return choose_split(blocks, self.schedule.stages, balance=balance,
                            sample_input=sample_input)

    def recall(self, key: str | None) -> dict | None:
        return None if key is None else cached_cut(key)

    def remember(self, key: str, tuning: dict) -> None:
        remember_cut(key, tuning)

    def _stages(self, blocks: nn.Sequential, cut: list[int]):
        modules = partition(blocks, self.schedule.stages, split=cut)
        ties = tie_groups(modules, self.schedule)
        originals = copy_tied(modules, ties)  # stages in one process share no tensor
        stages = [self.make_stage(k, self.schedule.stages, m, self.devices[k])
                  for k, m in enumerate(modules)]
        exchange = SharedTies(originals, self.placement.peer_timeout_s)
        for stage in stages:
            stage.bind_ties(ties, exchange)
        return stages

    def build_timed(self, blocks: nn.Sequential, cut: list[int],
                    record: Timeline) -> Executor:
        return self._threaded(blocks, cut, record)

    def _threaded(self, blocks: nn.Sequential, cut: list[int], timeline: Timeline | None,
                  **chosen) -> ThreadedExecutor:
        return ThreadedExecutor(self._stages(blocks, cut), self.schedule, timeline=timeline,
                                timeout_s=self.placement.peer_timeout_s, threads=self.threads,
                                **chosen)

    def build(self, blocks: nn.Sequential, cut: list[int], timeline: Timeline | None,
              tuning: dict | None) -> Executor:
        if self.kind == "threads":
            return self._threaded(blocks, cut, timeline, split=cut, split_tuning=tuning)
        return ReferenceExecutor(self._stages(blocks, cut), self.schedule, timeline=timeline,
                                 split=cut, split_tuning=tuning)


class _Ranks(_Side):
    """This rank's stage only, under the process runtime (K x R ranks with replicas)."""

    def __init__(self, schedule: Schedule, make_stage: StageFactory, placement: Placement):
        replicas = placement.replicas
        if not schedule.averages_replicas and replicas > 1:
            raise UsageError(f"replicas average delayed gradients between B and S of DDG; "
                             f"{schedule.name} runs one pipeline only: drop --replicas")
        self.schedule, self.make_stage, self.placement = schedule, make_stage, placement
        self.here = rank_device(placement.device, placement.devices)
        # world = K x R
        self.layout = process_layout(schedule.stages, replicas, self.here.type, placement.comm)

    def where(self) -> tuple[str, list[str], int]:
        ranks = self.schedule.stages * self.placement.replicas
        return "processes", [self.here.type] * ranks, torch.get_num_threads()

    def propose(self, blocks: nn.Sequential, balance: str,
                sample_input: Tensor | None) -> list[int]:
        return agreed_split(blocks, self.schedule.stages, balance, sample_input)

    def recall(self, key: str | None) -> dict | None:
        # rank 0's memory decides, so every rank (every node) uses the same cut
        shared = [cached_cut(key) if key is not None and self.layout.rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def remember(self, key: str, tuning: dict) -> None:
        if self.layout.rank == 0:
            remember_cut(key, tuning)

    def build_timed(self, blocks: nn.Sequential, cut: list[int],
                    record: Timeline) -> Executor:
        return self.build(blocks, cut, record, None)

    def build(self, blocks: nn.Sequential, cut: list[int], timeline: Timeline | None,
              tuning: dict | None) -> Executor:
        stages, placement = self.schedule.stages, self.placement
        modules = partition(blocks, stages, split=cut)
        ties = tie_groups(modules, self.schedule, placement.replicas)
        stage = self.make_stage(self.layout.stage, stages, modules[self.layout.stage], self.here)
        if ties:  # every rank finds the same ties, and makes the exchange's group with them
            stage.bind_ties(ties, RankTies(self.layout.rank_of, placement.peer_timeout_s))
        return ProcessExecutor(stage, self.schedule, timeline=timeline,
                               timeout_s=placement.peer_timeout_s, comm=placement.comm,
                               layout=self.layout, split=cut, split_tuning=tuning)


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

