"""Choose the cut by timing the pipeline: the block profile proposes, the clock decides.

Balancing profiled block times assumes a stage costs the sum of its blocks timed alone. In a
running pipeline that is only roughly true: all stages compute at once and share memory
bandwidth and caches, the early stages keep graphs alive across clocks, and the schedule
couples neighbours. So with ``balance="pipeline"`` the profiled cut and every cut one block
away run a few clocks each, as real pipelines, in interleaved rounds, and the cut with the
shortest median clock is kept. What runs a candidate (threads, processes) is the caller's:
:func:`fastest_cut` only gets a ``clock_s(cut)`` to call. The measured story of why is in
``docs/design.md``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from ddgpipe.core.rng import rng_kept

__all__ = ["candidate_splits", "fastest_cut", "cut_name"]


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


def fastest_cut(proposed: list[int], blocks: int, clock_s: Callable[[list[int]], float],
                rounds: int = 2) -> tuple[list[int], dict[str, float]]:
    """The candidate cut (:func:`candidate_splits`) whose ``clock_s(cut)`` is shortest.

    Returns ``(split, {cut name: median milliseconds per clock})``. Candidates are timed in
    ``rounds`` interleaved rounds so a slow minute does not single one out; a tie keeps
    ``proposed``. The random state is left as it was.
    """
    candidates = candidate_splits(proposed, blocks)
    if len(candidates) == 1:
        return list(proposed), {}
    times: dict[str, list[float]] = {cut_name(c): [] for c in candidates}
    with rng_kept():
        for _ in range(rounds):
            for cut in candidates:
                times[cut_name(cut)].append(clock_s(cut))
    medians = {k: 1000.0 * statistics.median(v) for k, v in times.items()}
    best = min(candidates, key=lambda c: (medians[cut_name(c)], c != proposed))
    return best, medians
