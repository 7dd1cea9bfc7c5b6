"""The cost model applied to a bench: predicted against measured DDG throughput, and K beyond

Why and how: ``docs/design.md``, "The cost model applied to a bench".
"""

from __future__ import annotations

import math

import torch

from ddgpipe.balance.costmodel import (
    StageTimes,
    predict_ddg,
    predict_replicas,
    simulate_ddg,
    stage_times_from_blocks,
)
from ddgpipe.balance.profile import BlockProfile, profile_blocks
from ddgpipe.bench.config import BenchConfig
from ddgpipe.bench.workload import bench_batch, bench_model

__all__ = ["predict_measured", "predict_scaling", "predicted_stage_ms", "REPLICA_LINK_GBPS"]

REPLICA_LINK_GBPS = 10.0
"""The link the replica predictions assume when none is given (10 Gbit/s Ethernet): with a
free link they would scale perfectly and say nothing."""


def predicted_stage_ms(block_ms: list[list[float]], split: list[int]) -> list[list[float]]:
    """Forward and backward milliseconds per stage that the block profile predicts."""
    blocks = [BlockProfile(f / 1000, b / 1000, 0) for f, b in block_ms]
    return [[1000 * s.forward_s, 1000 * s.backward_s]
            for s in stage_times_from_blocks(blocks, split)]


def predict_measured(row: dict, batch_size: int, activation_bytes: list[int],
                     bandwidth_bytes_per_s: float = math.inf) -> dict | None:
    """Prediction for one measured DDG row from its own per-stage profile."""
    profile = row.get("stage_profile")
    if not profile:
        return None
    times = [StageTimes(p["f_ms"] / 1000, (p["b_ms"] + p.get("s_ms", 0.0)) / 1000, nbytes)
             for p, nbytes in zip(profile, activation_bytes, strict=True)]
    clock = simulate_ddg(times, bandwidth_bytes_per_s=bandwidth_bytes_per_s, stash="graph")
    predicted = batch_size / clock
    return {"name": row["name"], "predicted_images_per_s": predicted,
            "measured_images_per_s": row["images_per_s"],
            "measured_over_predicted": row["images_per_s"] / predicted}


def predict_scaling(config: BenchConfig, stage_counts=(2, 4, 8, 16),
                    bandwidth_bytes_per_s: float = math.inf,
                    replica_stage_counts=(4, 8), replica_counts=(1, 2, 4, 8, 16),
                    replica_bandwidth_bytes_per_s: float | None = None) -> dict:
    """Predicted DDG speedup over one-thread backprop for several K, and for K x R, from a
    block profile. The replica rows use ``replica_bandwidth_bytes_per_s`` (default: the
    given bandwidth, or :data:`REPLICA_LINK_GBPS` when that is infinite)."""
    batch_size = config.batch_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = bench_model(config)
        x, _ = bench_batch(config)
        blocks = profile_blocks(model, x, repeats=3, warmup=1)
    finally:
        torch.set_num_threads(threads)
    rows = []
    stage_counts = tuple(stage_counts)
    for k in stage_counts:
        if k > len(blocks):
            continue
        pred = predict_ddg(blocks, k, batch_size, bandwidth_bytes_per_s=bandwidth_bytes_per_s)
        rows.append({"stages": k, "split": pred.split, "clock_ms": 1000 * pred.clock_s,
                     "images_per_s": pred.images_per_s,
                     "speedup_vs_bp_1t": pred.speedup_vs_backprop})
    link = replica_bandwidth_bytes_per_s or (
        bandwidth_bytes_per_s if math.isfinite(bandwidth_bytes_per_s)
        else REPLICA_LINK_GBPS * 1e9 / 8)
    replica_rows = []
    for k in replica_stage_counts:
        if k > len(blocks):
            continue
        for r in replica_counts:
            if batch_size % r:
                continue
            pred = predict_replicas(blocks, k, r, batch_size, bandwidth_bytes_per_s=link)
            replica_rows.append({"stages": k, "replicas": r, "devices": k * r,
                                 "split": pred.split, "clock_ms": 1000 * pred.clock_s,
                                 "images_per_s": pred.images_per_s,
                                 "speedup_vs_bp_1t": pred.speedup_vs_backprop})
    return {"blocks": len(blocks), "activation_bytes": [b.output_bytes for b in blocks],
            "param_bytes": [b.param_bytes for b in blocks],
            "replica_link_bytes_per_s": link, "replica_rows": replica_rows,
            "block_ms": [[1000 * b.forward_s, 1000 * b.backward_s] for b in blocks],
            "bandwidth_bytes_per_s": None if math.isinf(bandwidth_bytes_per_s)
            else bandwidth_bytes_per_s, "rows": rows}
