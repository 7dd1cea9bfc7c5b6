"""Cut a model into stages, put each on its device, and pick the executor that runs them.

Three executors walk the same schedule with the same ``Stage`` calls, so they agree bitwise:

* ``reference`` — every stage in this thread, clock by clock: the spec, for debugging and
  timelines;
* ``threads`` — one thread per stage in this process (the default for K > 1 on one machine:
  CPU cores or GPUs);
* ``processes`` — one stage per process over torch.distributed (torchrun, several nodes, or
  ``ddgpipe train --executor processes``); each rank builds only its own stage. Only it runs
  R > 1 replicas of the pipeline (K x R processes, see :mod:`ddgpipe.layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ddgpipe.cutcache import cached_cut, cut_key, remember_cut
from ddgpipe.devices import rank_device, stage_devices
from ddgpipe.errors import UsageError
from ddgpipe.layout import process_layout
from ddgpipe.partition import balanced_split, block_costs, check_model, cut_points, partition
from ddgpipe.reference import ReferenceExecutor
from ddgpipe.stage import Stage
from ddgpipe.threaded import ThreadedExecutor, threads_per_stage
from ddgpipe.timeline import Timeline
from ddgpipe.tuning import fastest_split, fastest_threaded_split

__all__ = ["BUILD_BALANCE_MODES", "EXECUTORS", "world_size", "choose_executor",
           "build_stages", "agreed_split"]

BUILD_BALANCE_MODES = ("params", "flops", "time", "pipeline")
"""``pipeline``: the profiled cut and its neighbours timed as real pipelines (see tuning.py)."""

EXECUTORS = ("reference", "threads", "processes")

StageFactory = Callable[[int, int, nn.Module, torch.device], Stage]


def world_size() -> int:
    """Processes in the default group, or 1 when torch.distributed is not in use."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def choose_executor(executor: str | None, stages: int, replicas: int = 1) -> str:
    """The executor to use: ``processes`` under torch.distributed, else as asked (default:
    ``threads`` for K > 1, ``reference`` for K = 1)."""
    if executor is not None and executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if replicas < 1:
        raise UsageError(f"replicas must be >= 1 (got {replicas})")
    if replicas > 1 and (world_size() == 1 or executor not in (None, "processes")):
        raise UsageError(
            f"{replicas} replicas run one process per stage and replica, under the process "
            f"runtime: start {stages} x {replicas} = {stages * replicas} ranks with torchrun, "
            "with `ddgpipe train --executor processes --replicas R`, or with "
            "ddgpipe.launch.run_workers, and build the pipeline in each"
        )
    if world_size() > 1:
        if executor not in (None, "processes"):
            raise UsageError(f"executor {executor!r} runs every stage in one process, but this "
                             f"process is one of {world_size()} ranks (torchrun or the "
                             "launcher): leave the executor out or choose processes")
        return "processes"
    if executor == "processes":
        raise UsageError("executor 'processes' runs one stage per process: start the ranks "
                         "with torchrun, with `ddgpipe train --executor processes`, or with "
                         "ddgpipe.launch.run_workers, and build the pipeline in each")
    if executor is None:
        return "threads" if stages > 1 else "reference"
    return executor


def build_stages(
    model: nn.Module,
    stages: int,
    make_stage: StageFactory,
    method: str,
    *,
    split: list[int] | None,
    balance: str | None,
    sample_input: Tensor | None,
    timeline: Timeline | None,
    peer_timeout_s: float = 300.0,
    executor: str | None = None,
    device: str | torch.device = "cpu",
    devices: Sequence[str | torch.device] | None = None,
    threads: int | None = None,
    comm: str = "auto",
    schedule: tuple[str, str] = ("graph", "fp32"),
    replicas: int = 1,
):
    """Return ``(stage_list, executor)`` for this process.

    ``replicas`` copies of the pipeline train on shards of each minibatch (process runtime
    only: K x ``replicas`` ranks).

    Without ``split`` or ``balance``, a pipeline of several stages fed a ``sample_input`` is
    cut where this machine ran it fastest: the timed cut remembered for this model, schedule
    (``schedule`` = stash mode, precision), executor and layout (:mod:`ddgpipe.cutcache`), or
    a new timing (``balance="pipeline"`` always times again). The in-process executors share
    the threads' cut, so the reference gives the threaded executor's numbers.
    """
    kind = choose_executor(executor, stages, replicas)
    remembered = balance is None and sample_input is not None and stages > 1
    if balance is None:
        balance = "pipeline" if remembered else "params"
    if balance not in BUILD_BALANCE_MODES:
        raise UsageError(f"unknown balance {balance!r}; choose one of "
                         f"{', '.join(BUILD_BALANCE_MODES)}")
    # "pipeline" starts from the profiled cut
    profiled = "time" if balance == "pipeline" else balance
    if kind == "processes":
        return _build_rank_stage(model, stages, replicas, make_stage, method, split, balance,
                                 profiled, sample_input, timeline, peer_timeout_s,
                                 rank_device(device, devices), comm, remembered, schedule)
    placed = stage_devices(stages, device, devices)
    threads = threads or threads_per_stage(stages)
    tuning = None
    if split is None and balance == "pipeline" and stages > 1:
        key = cut_key(model, sample_input, stages, method, *schedule, "threads",
                      [str(d) for d in placed], threads)
        tuning = cached_cut(key) if remembered else None
        if tuning is None:
            proposed = cut_points(partition(model, stages, balance=profiled,
                                            sample_input=sample_input))
            split, clock_ms = fastest_threaded_split(model, make_stage, method, sample_input,
                                                     proposed, placed, threads=threads,
                                                     timeout_s=peer_timeout_s)
            tuning = {"split": split, "profiled_split": proposed, "clock_ms": clock_ms}
            remember_cut(key, tuning)
        split = tuning["split"]
    modules = partition(model, stages, split=split, balance=profiled,
                        sample_input=sample_input)
    stage_list = [make_stage(k, len(modules), m, placed[k]) for k, m in enumerate(modules)]
    if kind == "threads":
        runner = ThreadedExecutor(stage_list, method=method, timeline=timeline,
                                  timeout_s=peer_timeout_s, threads=threads)
    else:
        runner = ReferenceExecutor(stage_list, method=method, timeline=timeline)
    runner.split = cut_points(modules)
    runner.split_tuning = tuning
    runner.kind = kind
    return stage_list, runner


def _build_rank_stage(model, stages, replicas, make_stage, method, split, balance, profiled,
                      sample_input, timeline, peer_timeout_s, here: torch.device, comm: str,
                      remembered: bool, schedule: tuple[str, str]):
    from ddgpipe.distributed import DistributedExecutor

    if method != "ddg" and replicas > 1:
        raise UsageError(f"replicas average delayed gradients between B and S of DDG; {method} "
                         "runs one pipeline only: drop --replicas")
    layout = process_layout(stages, replicas, here.type, comm)  # refuses world != K x R
    rank = dist.get_rank()
    tuning = None
    if split is None and balance == "pipeline":
        key = cut_key(model, sample_input, stages, method, *schedule, "processes",
                      [here.type] * (stages * replicas), torch.get_num_threads())
        # rank 0's memory decides, so every rank (every node) uses the same cut
        shared = [cached_cut(key) if remembered and rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        tuning = shared[0]
        if tuning is None:
            proposed = agreed_split(model, stages, profiled, sample_input)
            split, clock_ms = fastest_split(model, make_stage, method, sample_input, proposed,
                                            here, layout, timeout_s=peer_timeout_s)
            tuning = {"split": split, "profiled_split": proposed, "clock_ms": clock_ms}
            if rank == 0:
                remember_cut(key, tuning)
        split = tuning["split"]
    elif split is None:
        split = agreed_split(model, stages, profiled, sample_input)
    modules = partition(model, stages, split=split)
    stage = make_stage(layout.stage, stages, modules[layout.stage], here)
    runner = DistributedExecutor(stage, method=method, timeline=timeline,
                                 timeout_s=peer_timeout_s, comm=comm, layout=layout)
    runner.split = cut_points(modules)
    runner.split_tuning = tuning
    runner.kind = "processes"
    return [stage], runner


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
