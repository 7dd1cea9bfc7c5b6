"""Choose the cut by timing the pipeline: the block profile proposes, the clock decides.

Balancing profiled block times assumes a stage costs the sum of its blocks timed alone. In a
running pipeline that is only roughly true: all stages compute at once and share memory
bandwidth and caches, the early stages keep graphs alive across clocks, and the schedule
couples neighbours. So with ``balance="pipeline"`` the profiled cut and every cut one block
away run a few clocks each, as real pipelines, in interleaved rounds, and the cut with the
shortest median clock is kept (the better-balanced one among near-ties). What runs a
candidate (threads, processes) is the caller's: :func:`fastest_cut` only gets a
``time_cut(cut)`` to call. The measured story of why is in ``docs/design.md``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from ddgpipe.core.rng import rng_kept

__all__ = ["candidate_splits", "fastest_cut", "cut_name", "imbalance", "Timing", "NOISE",
           "BALANCED"]


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


def cut_name(cut: list[int]) -> str:
    """A cut as text, ``"4,8"``: the key of its timing."""
    return ",".join(map(str, cut))


Timing = tuple[float, list[float]]
"""Seconds per clock of a pipeline, and each stage's seconds of compute per clock."""

NOISE = 0.03  # clocks within 3% of the fastest (or of its rounds' spread) are a tie
BALANCED = 0.10  # a cut whose stages' busy times differ by more is imbalanced


def imbalance(busy: list[float]) -> float:
    """How far apart the stages' busy times are: (slowest - fastest) / slowest."""
    return (max(busy) - min(busy)) / max(busy) if busy and max(busy) > 0 else 0.0


def fastest_cut(proposed: list[int], blocks: int, time_cut: Callable[[list[int]], Timing],
                rounds: int = 2) -> tuple[list[int], dict]:
    """The candidate cut (:func:`candidate_splits`) to keep, and its timings.

    Candidates are timed in ``rounds`` interleaved rounds, so a slow minute does not single one
    out, and the fastest median clock wins, unless its stages are imbalanced (busy times more
    than :data:`BALANCED` apart) while a better-balanced candidate is within noise of it
    (:data:`NOISE`, or the rounds' spread when larger): the clocks cannot tell those apart,
    and the balanced cut wastes no stage's time waiting. A tie keeps ``proposed``. The random
    state is left as it was. Returns ``(split, {"clock_ms", "busy_ms", "imbalance",
    "chosen_by"})``, keyed by cut name.
    """
    candidates = candidate_splits(proposed, blocks)
    if len(candidates) == 1:
        return list(proposed), {}
    clocks: dict[str, list[float]] = {cut_name(c): [] for c in candidates}
    busy: dict[str, list[list[float]]] = {cut_name(c): [] for c in candidates}
    with rng_kept():
        for _ in range(rounds):
            for cut in candidates:
                clock_s, stage_s = time_cut(cut)
                clocks[cut_name(cut)].append(clock_s)
                busy[cut_name(cut)].append(stage_s)
    clock_ms = {k: 1000.0 * statistics.median(v) for k, v in clocks.items()}
    busy_ms = {k: [1000.0 * statistics.median(s) for s in zip(*v)] for k, v in busy.items()}
    spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in clocks.items()}
    apart = {k: imbalance(v) for k, v in busy_ms.items()}
    fastest = min(candidates, key=lambda c: (clock_ms[cut_name(c)], c != proposed))
    best, chosen_by = fastest, "fastest clock"
    top = cut_name(fastest)
    if apart[top] > BALANCED:
        ties = [c for c in candidates if clock_ms[cut_name(c)] <= clock_ms[top] * (
            1 + max(NOISE, spread[top], spread[cut_name(c)]))]
        balanced = min(ties, key=lambda c: (apart[cut_name(c)], clock_ms[cut_name(c)]))
        if apart[cut_name(balanced)] < apart[top]:
            best, chosen_by = balanced, (f"better balanced than {top} ({apart[top]:.0%} apart) "
                                         "within the clocks' noise")
    return best, {"clock_ms": clock_ms, "busy_ms": busy_ms, "imbalance": apart,
                  "spread": spread, "chosen_by": chosen_by}
