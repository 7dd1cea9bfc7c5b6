"""Predict DDG throughput from the schedule and measured per-stage times.

Why and how: ``docs/design.md``, "The cost model".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ddgpipe.balance.partition import balanced_split
from ddgpipe.balance.profile import BlockProfile, profile_blocks
from ddgpipe.core.schedule import DDGSchedule, Schedule

__all__ = [
    "BlockProfile",
    "StageTimes",
    "Prediction",
    "profile_blocks",
    "stage_times_from_blocks",
    "simulate_ddg",
    "predict_ddg",
    "predict_replicas",
    "allreduce_s",
    "backprop_step_s",
]


@dataclass(frozen=True)
class StageTimes:
    """One stage's compute per clock and the size of the activation it sends on."""

    forward_s: float
    backward_s: float
    output_bytes: int = 0
    param_bytes: int = 0


@dataclass(frozen=True)
class Prediction:
    stages: int
    split: list[int]
    stage_times: list[StageTimes]
    clock_s: float          # steady-state seconds per clock (= per minibatch)
    images_per_s: float
    speedup_vs_backprop: float


def stage_times_from_blocks(
    blocks: Sequence[BlockProfile], split: Sequence[int]
) -> list[StageTimes]:
    bounds = [0, *split, len(blocks)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        part = blocks[a:b]
        out.append(StageTimes(sum(p.forward_s for p in part), sum(p.backward_s for p in part),
                              part[-1].output_bytes, sum(p.param_bytes for p in part)))
    return out


def allreduce_s(nbytes: int, replicas: int, bandwidth_bytes_per_s: float = math.inf,
                latency_s: float = 0.0) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``replicas`` devices."""
    if replicas <= 1 or nbytes == 0:
        return 0.0
    steps = 2 * (replicas - 1)
    return steps / replicas * nbytes / bandwidth_bytes_per_s + steps * latency_s


def simulate_ddg(
    stage_times: Sequence[StageTimes],
    *,
    clocks: int = 64,
    bandwidth_bytes_per_s: float = math.inf,
    latency_s: float = 0.0,
    stash: str = "graph",
    replicas: int = 1,
    bucket_bytes: int = 1 << 20,
    schedule: Schedule | None = None,
) -> float:
    """Steady-state seconds per clock of DDG with these stages (event simulation), walking
    ``schedule`` (default: DDG's for as many stages).

    With ``replicas`` > 1 each stage's step waits for the average of its gradient over the
    replicas (the module docstring says what is assumed); ``stage_times`` are then those of
    one replica, on its shard of the batch.
    """
    stages = len(stage_times)
    if stages < 1 or clocks < 4:
        raise ValueError("need at least one stage and four clocks")
    schedule = schedule or DDGSchedule(stages)
    if schedule.stages != stages:
        raise ValueError(f"a schedule of {schedule.stages} stages cannot simulate "
                         f"{stages} stage times; pass one time per stage")

    def transfer(nbytes: int) -> float:
        return latency_s + (nbytes / bandwidth_bytes_per_s if nbytes else 0.0)

    free = [0.0] * stages                     # when each stage's worker is next idle
    act_arrives: dict[tuple[int, int], float] = {}   # (stage, minibatch) input ready
    grad_arrives: dict[tuple[int, int], float] = {}  # (stage, minibatch) gradient ready
    last_forward_end: dict[int, float] = {}
    for clock in range(clocks):
        for k, times in enumerate(stage_times):
            for action in schedule.actions(k, clock):
                m = action.minibatch
                if action.op == "F":
                    start = max(free[k], act_arrives.get((k, m), 0.0))
                    free[k] = start + times.forward_s
                    if k + 1 < stages:
                        act_arrives[(k + 1, m)] = free[k] + transfer(times.output_bytes)
                    else:
                        last_forward_end[m] = free[k]
                elif action.op == "B":
                    start = max(free[k], grad_arrives.get((k, m), 0.0))
                    extra = times.forward_s if stash in ("recompute", "none") else 0.0
                    free[k] = start + times.backward_s + extra
                    if k > 0:
                        incoming = stage_times[k - 1].output_bytes
                        grad_arrives[(k - 1, m)] = free[k] + transfer(incoming)
                    average = allreduce_s(times.param_bytes, replicas, bandwidth_bytes_per_s,
                                          latency_s)
                    if average:  # the step waits for the last bucket's average
                        buckets = max(1, math.ceil(times.param_bytes / bucket_bytes))
                        free[k] = max(free[k] + average / buckets, start + average)
    # Steady state: the rate at which minibatches leave the last stage, second half only.
    first, last = clocks // 2, clocks - 1
    return (last_forward_end[last] - last_forward_end[first]) / (last - first)


def backprop_step_s(blocks: Sequence[BlockProfile]) -> float:
    return sum(b.forward_s + b.backward_s for b in blocks)


def predict_ddg(
    blocks: Sequence[BlockProfile],
    stages: int,
    batch_size: int,
    *,
    split: Sequence[int] | None = None,
    bandwidth_bytes_per_s: float = math.inf,
    latency_s: float = 0.0,
    stash: str = "graph",
) -> Prediction:
    """Predicted DDG throughput with K = ``stages`` from per-block times."""
    if split is None:
        split = balanced_split([b.forward_s + b.backward_s for b in blocks], stages)
    times = stage_times_from_blocks(blocks, split)
    clock_s = simulate_ddg(times, bandwidth_bytes_per_s=bandwidth_bytes_per_s,
                           latency_s=latency_s, stash=stash)
    return Prediction(stages, list(split), times, clock_s, batch_size / clock_s,
                      backprop_step_s(blocks) / clock_s)


def predict_replicas(
    blocks: Sequence[BlockProfile],
    stages: int,
    replicas: int,
    batch_size: int,
    *,
    split: Sequence[int] | None = None,
    bandwidth_bytes_per_s: float = math.inf,
    latency_s: float = 0.0,
    stash: str = "graph",
) -> Prediction:
    """Predicted throughput of K = ``stages`` x R = ``replicas`` from per-block times measured
    at the global ``batch_size`` (each replica computes on 1/R of it; module docstring)."""
    if split is None:
        split = balanced_split([b.forward_s + b.backward_s for b in blocks], stages)
    full = stage_times_from_blocks(blocks, split)
    shard = [StageTimes(t.forward_s / replicas, t.backward_s / replicas,
                        t.output_bytes // replicas, t.param_bytes) for t in full]
    clock_s = simulate_ddg(shard, bandwidth_bytes_per_s=bandwidth_bytes_per_s,
                           latency_s=latency_s, stash=stash, replicas=replicas)
    return Prediction(stages, list(split), shard, clock_s, batch_size / clock_s,
                      backprop_step_s(blocks) / clock_s)
