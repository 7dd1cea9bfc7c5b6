"""Records who computed what, when: the data behind the pipeline timeline plot."""

from __future__ import annotations

import json
from pathlib import Path

from ddgpipe.core.schedule import Action

__all__ = ["Timeline"]


class Timeline:
    """Collects (stage, op, minibatch, start, end) records, optionally only the first clocks.

    Times are ``time.perf_counter`` seconds; the plot shows them relative to the first start.
    Limiting to ``max_minibatches`` keeps long runs from growing a huge file.
    """

    def __init__(self, max_minibatches: int | None = 64, rank: int | None = None):
        self.max_minibatches = max_minibatches
        self.rank = rank
        self.records: list[dict] = []
        # (stage, start, end) of every wait for a peer or for data: a bench subtracts them
        # from the ops that contain them to get compute times
        self.waits: list[tuple[int, float, float]] = []

    def record(self, action: Action, start: float, end: float) -> None:
        if self.max_minibatches is not None and action.minibatch >= self.max_minibatches:
            return
        rec = {"stage": action.stage, "op": action.op, "minibatch": action.minibatch,
               "start": start, "end": end}
        if self.rank is not None:
            rec["rank"] = self.rank
        self.records.append(rec)

    def record_wait(self, stage: int, start: float, end: float) -> None:
        self.waits.append((stage, start, end))

    def busy_s(self, stage: int, start: float, end: float) -> float:
        """Seconds ``stage`` computed between ``start`` and ``end``: its ops that ran there,
        less the waits for peers inside them."""
        waits = [(a, b) for k, a, b in self.waits if k == stage]
        busy = 0.0
        for r in self.records:
            if r["stage"] == stage and r["start"] >= start and r["end"] <= end:
                inside = sum(max(0.0, min(r["end"], b) - max(r["start"], a)) for a, b in waits)
                busy += max(0.0, r["end"] - r["start"] - inside)
        return busy

    def write(self, path: str | Path, append: bool = False) -> Path:
        path = Path(path)
        with path.open("a" if append else "w") as f:
            for rec in self.records:
                f.write(json.dumps(rec) + "\n")
        return path
