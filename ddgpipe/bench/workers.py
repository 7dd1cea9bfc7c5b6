"""The worker functions: one per kind of configuration, each run in fresh spawned processes.

Every worker builds the same model (same seed, so the same weights), the same synthetic
batch and the bench's optimizer (``BenchConfig.optimizer``; a DDG row named ``ROW+COMP`` adds
its compensation), runs ``warmup`` untimed steps, then times ``steps`` steps between two
barriers and returns ``{"elapsed_s", "peak_mem_mb", ...}``. Peak memory is the process's
maximum resident set size, which is why every configuration gets processes of its own; on
GPUs it is also each device's peak allocated memory (``peak_gpu_mb``), and the window is
timed with CUDA events recorded after every stage's stream has joined the default one.
"""

from __future__ import annotations

import itertools
import resource
import time
from collections.abc import Callable
from typing import cast

import torch
import torch.distributed as dist

from ddgpipe.bench.config import BenchConfig, ConfigSpec, compensation_spec
from ddgpipe.bench.workload import bench_batch, bench_loss, bench_model, bench_optimizer
from ddgpipe.runtime.processes import ProcessExecutor

__all__ = ["profile_split_worker", "threaded_split_worker", "run_config_worker"]

_model = bench_model


def _device(cfg: BenchConfig, rank: int = 0) -> torch.device:
    if cfg.device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", rank % torch.cuda.device_count())


_batch = bench_batch


def _peak_mem_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _gpu_sync(cfg: BenchConfig) -> None:
    if cfg.device != "cpu":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def _timed(step: Callable[[], object], cfg: BenchConfig, world_size: int,
           settle: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Warm up, then time ``cfg.steps`` steps; returns the window's (start, end) seconds.

    ``settle`` waits for work a step leaves running (a threaded pipeline's earlier stages),
    so the window holds exactly ``cfg.steps`` clocks. On GPUs the window is measured by CUDA
    events and placed on the ``perf_counter`` axis at its start.
    """
    for _ in range(cfg.warmup):
        step()
    settle()
    _gpu_sync(cfg)
    _barrier(world_size)
    if cfg.device != "cpu":
        start_event = torch.cuda.Event(enable_timing=True)
        end_event = torch.cuda.Event(enable_timing=True)
        start_event.record()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    settle()
    if cfg.device != "cpu":
        _gpu_sync(cfg)  # every stage's stream is done: the end event closes the window
        end_event.record()
        end_event.synchronize()
        _barrier(world_size)
        return t0, t0 + start_event.elapsed_time(end_event) / 1000
    _barrier(world_size)
    return t0, time.perf_counter()


def _gpu_peaks(cfg: BenchConfig) -> list[float]:
    if cfg.device == "cpu":
        return []
    return [torch.cuda.max_memory_allocated(i) / 2**20 for i in range(torch.cuda.device_count())]


def profile_split_worker(rank: int, world_size: int, cfg: BenchConfig,
                         stash: str = "graph") -> dict:
    """The cut DDG's runtime chooses by default (``balance="pipeline"``) for ``stash``, run on
    K workers.

    Returns ``{"split", "profiled_split", "clock_ms", "busy_ms", "imbalance", "chosen_by"}``:
    the cut the configurations of this stash mode use, the one balanced block profiling
    proposed, and each candidate's timed clock and stage busy times.
    """
    from ddgpipe.methods import DDG
    from ddgpipe.runtime.allocator import allocator_setting

    x, _ = _batch(cfg)
    pipe = DDG(_model(cfg), stages=world_size, optimizer=bench_optimizer(cfg), stash=stash,
               balance="pipeline", sample_input=x, device=_device(cfg, rank),
               comm=_comm(cfg))
    return _cut_record(pipe.executor) | {"allocator": allocator_setting()}


def threaded_split_worker(rank: int, world_size: int, cfg: BenchConfig, threads: int,
                          stash: str = "graph") -> dict:
    """The cut the threaded executor chooses with ``balance="pipeline"`` for ``stash``, in one
    process."""
    from ddgpipe.methods import DDG

    x, _ = _batch(cfg)
    pipe = DDG(_model(cfg), stages=cfg.stages, optimizer=bench_optimizer(cfg), stash=stash,
               balance="pipeline", sample_input=x, executor="threads", threads=threads,
               device=cfg.device)
    pipe.close()
    return _cut_record(pipe.executor)


def _cut_record(executor) -> dict:
    """The cut kept and why: every candidate's clock, stage busy times and imbalance."""
    tuning = executor.split_tuning or {}
    return {"split": executor.split, "profiled_split": tuning.get("profiled_split"),
            **{key: tuning.get(key, {}) for key in ("clock_ms", "busy_ms", "imbalance")},
            "chosen_by": tuning.get("chosen_by")}


def _comm(cfg: BenchConfig) -> str:
    """nccl between GPUs when every rank has its own, host memory when they share."""
    if cfg.device == "cpu" or torch.cuda.device_count() >= cfg.stages:
        return "auto"
    return "host"


def run_config_worker(rank: int, world_size: int, cfg: BenchConfig, spec: ConfigSpec,
                      split: list[int]) -> dict:
    """Run one configuration on this rank; see the module docstring for what comes back."""
    runner = {"bp": _run_bp, "ddp": _run_ddp, "gpipe": _run_sync_pipe, "1f1b": _run_sync_pipe,
              "ddg": _run_ddg, "ddg-threads": _run_ddg_threads,
              "ddg-replicas": _run_ddg_replicas}[spec.kind]
    if cfg.device != "cpu":
        torch.cuda.set_device(_device(cfg, rank))
    out = runner(rank, world_size, cfg, spec, split)
    out["peak_mem_mb"] = _peak_mem_mb()
    out["peak_gpu_mb"] = _gpu_peaks(cfg)
    out["rank"] = rank
    out["threads"] = torch.get_num_threads()
    return out


def _stepping(cfg: BenchConfig, spec: ConfigSpec) -> dict:
    """A DDG row's optimizer and its compensation (a ``ROW+COMP`` row's, with the options
    :func:`resolve` checked): what it steps with is part of what it times."""
    compensation = compensation_spec(cfg, spec.compensation)
    return {"optimizer": bench_optimizer(cfg), "compensation": compensation.names or None,
            "compensation_options": dict(compensation.options) or None}


def _run_bp(rank, world_size, cfg, spec, split) -> dict:
    from ddgpipe.methods import Backprop

    x, y = _batch(cfg, _device(cfg))
    method = Backprop(_model(cfg), bench_optimizer(cfg), device=_device(cfg),
                      compile=spec.compile)
    t0, t1 = _timed(lambda: method.step(x, y, bench_loss(cfg)), cfg, world_size)
    return {"elapsed_s": t1 - t0}


def _run_ddp(rank, world_size, cfg, spec, split) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    device = _device(cfg, rank)
    x, y = _batch(cfg, device)
    share = cfg.batch_size // world_size
    x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    model = DistributedDataParallel(_model(cfg).to(device))
    opt = bench_optimizer(cfg)(model.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        bench_loss(cfg)(model(x), y).backward()
        opt.step()

    t0, t1 = _timed(step, cfg, world_size)
    return {"elapsed_s": t1 - t0}


def _run_sync_pipe(rank, world_size, cfg, spec, split) -> dict:
    """GPipe or 1F1B from torch.distributed.pipelining, one stage per rank, on gloo/CPU."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from ddgpipe.balance.partition import partition

    device = _device(cfg, rank)
    x, y = _batch(cfg, device)
    module = partition(_model(cfg), world_size, split=split)[rank].to(device)
    stage = PipelineStage(module, rank, world_size, device)
    schedule_cls = ScheduleGPipe if spec.kind == "gpipe" else Schedule1F1B
    # scale_grads (the default) divides each microbatch's mean loss gradient by M, so the
    # accumulated gradient is that of the whole batch's mean loss, as in the other configs.
    schedule = schedule_cls(stage, n_microbatches=spec.microbatches, loss_fn=bench_loss(cfg))
    opt = bench_optimizer(cfg)(module.parameters())
    first, last = rank == 0, rank == world_size - 1

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if first:
            schedule.step(x)
        elif last:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        opt.step()

    t0, t1 = _timed(step, cfg, world_size)
    return {"elapsed_s": t1 - t0}


def _run_ddg(rank, world_size, cfg, spec, split) -> dict:
    from ddgpipe.core.timeline import Timeline
    from ddgpipe.methods import DDG

    device = _device(cfg, rank)
    x, y = _batch(cfg, device)
    timeline = Timeline(max_minibatches=None)
    pipe = DDG(_model(cfg), stages=world_size, stash=spec.stash, split=list(split),
               timeline=timeline, device=device, comm=_comm(cfg), compile=spec.compile,
               microbatches=spec.microbatches or 1, **_stepping(cfg, spec))
    first, last = rank == 0, rank == world_size - 1
    xs, ys, loss_fn = (x if first else None), (y if last else None), bench_loss(cfg)

    t0, t1 = _timed(lambda: pipe.step(xs, ys, loss_fn if last else None), cfg, world_size)
    pipe.drain()  # after the timed window: only so every process exits cleanly
    # The timeline times whole ops, and an op that receives (a later stage's forward, an
    # earlier stage's backward) includes the wait for the peer; the executor logs its waits,
    # and subtracting them leaves the compute.
    waits = [(a, b) for _, a, b in timeline.waits]
    return {"elapsed_s": t1 - t0,
            "stage_profile": stage_profile(timeline.records, waits, t0, t1, cfg.steps, rank)}


def _run_ddg_replicas(rank, world_size, cfg, spec, split) -> dict:
    """DDG with K stages x R replicas: every rank feeds the global batch, the executor keeps
    its replica's shard; gradients are averaged over the replicas before each step."""
    from ddgpipe.core.timeline import Timeline
    from ddgpipe.methods import DDG

    device = _device(cfg, rank)
    x, y = _batch(cfg, device)
    timeline = Timeline(max_minibatches=None)
    gpus = torch.cuda.device_count() if cfg.device != "cpu" else 0
    comm = "auto" if cfg.device == "cpu" or gpus >= world_size else "host"
    pipe = DDG(_model(cfg), stages=spec.stages, stash=spec.stash, split=list(split),
               timeline=timeline, device=device, comm=comm, replicas=spec.replicas,
               **_stepping(cfg, spec))
    layout = cast(ProcessExecutor, pipe.executor).layout
    t0, t1 = _timed(lambda: pipe.step(x, y, bench_loss(cfg)), cfg, world_size)
    pipe.drain()
    waits = [(a, b) for _, a, b in timeline.waits]
    profile = stage_profile(timeline.records, waits, t0, t1, cfg.steps, layout.stage)
    profile["replica"] = layout.replica
    return {"elapsed_s": t1 - t0, "stage_profile": profile}


def _run_ddg_threads(rank, world_size, cfg, spec, split) -> dict:
    """DDG on the threaded executor: every stage a thread of this one process."""
    from ddgpipe.core.timeline import Timeline
    from ddgpipe.methods import DDG

    x, _ = _batch(cfg, _device(cfg, 0))
    _, y = _batch(cfg, _device(cfg, cfg.stages - 1))
    timeline = Timeline(max_minibatches=None)
    with DDG(_model(cfg), stages=cfg.stages, stash=spec.stash, split=list(split),
             timeline=timeline, executor="threads", threads=spec.threads, device=cfg.device,
             compile=spec.compile, **_stepping(cfg, spec)) as pipe:
        # As the training loop feeds it: minibatches queued ahead of the losses it awaits.
        losses = pipe.run(itertools.repeat((x, y)), bench_loss(cfg))
        t0, t1 = _timed(lambda: next(losses), cfg, world_size, settle=pipe.sync)
        losses.close()
        pipe.drain()
    profiles = []
    for k in range(cfg.stages):
        records = [r for r in timeline.records if r["stage"] == k]
        waits = [(a, b) for stage, a, b in timeline.waits if stage == k]
        profiles.append(stage_profile(records, waits, t0, t1, cfg.steps, k))
    return {"elapsed_s": t1 - t0, "stage_profiles": profiles}


def _overlap(a0: float, a1: float, intervals: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(a1, b1) - max(a0, b0)) for b0, b1 in intervals)


def stage_profile(records: list[dict], waits: list[tuple[float, float]] | None, t0: float,
                  t1: float, clocks: int, rank: int) -> dict:
    """Per-clock op times and utilisation of one DDG stage over the timed window [t0, t1].

    ``f_ms``/``b_ms``/``s_ms`` are mean compute milliseconds per clock (waits for peers
    excluded when they were logged), ``wait_ms`` the mean time per clock blocked on a peer,
    ``busy_s`` the total compute time and ``utilisation`` = busy_s / wall_s.
    """
    wall = t1 - t0
    logged = waits is not None
    waits = waits or []
    window = [r for r in records if r["start"] >= t0 and r["end"] <= t1]
    totals = {"F": 0.0, "B": 0.0, "S": 0.0}
    for r in window:
        dur = r["end"] - r["start"] - _overlap(r["start"], r["end"], waits)
        totals[r["op"]] = totals.get(r["op"], 0.0) + max(0.0, dur)
    busy = sum(totals.values())
    waited = _overlap(t0, t1, waits)
    profile = {f"{op.lower()}_ms": 1000.0 * t / clocks for op, t in totals.items()}
    profile.update(stage=rank, wait_ms=1000.0 * waited / clocks, busy_s=busy, wall_s=wall,
                   utilisation=busy / wall if wall > 0 else 0.0,
                   waits_logged=logged)
    return profile
