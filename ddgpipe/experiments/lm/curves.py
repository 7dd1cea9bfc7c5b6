"""Held-out loss curves of the language-model runs, and the steps a curve needs to reach a
loss: the iso-loss step ratio (how many of backprop's steps a method needs for its loss)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from ddgpipe.training.plots import read_jsonl

__all__ = ["Curve", "read_curve", "mean_curve", "steps_to_reach"]

#: (iterations, held-out losses in nats per byte) at each eval
Curve = tuple[list[int], list[float]]


def read_curve(run_dir: str | Path) -> Curve:
    """The eval records of a run's ``metrics.jsonl`` as a curve (empty when there are none)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [r for r in read_jsonl(path) if r.get("kind") == "eval"] if path.exists() else []
    return [int(r["iteration"]) for r in records], [float(r["val_loss"]) for r in records]


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """The mean over seeds at the iterations every curve has (seeds share the eval points)."""
    if not curves:
        return [], []
    shared = sorted(set.intersection(*(set(c[0]) for c in curves)))
    by_iteration = [dict(zip(*c, strict=True)) for c in curves]
    return shared, [statistics.fmean(c[i] for c in by_iteration) for i in shared]


def steps_to_reach(curve: Curve, target: float) -> float | None:
    """The first iteration at which ``curve`` reaches ``target``, interpolated linearly
    between the evals around the crossing; None when it never does. A curve already at the
    target at its first eval reached it by then: that eval's iteration."""
    iterations, losses = curve
    for i, (step, loss) in enumerate(zip(iterations, losses, strict=True)):
        if math.isnan(loss) or loss > target:
            continue
        if i == 0:
            return float(step)
        before, previous = iterations[i - 1], losses[i - 1]
        if math.isnan(previous):
            return float(step)
        return before + (previous - target) / (previous - loss) * (step - before)
    return None
