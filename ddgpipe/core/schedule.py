"""What every stage does at every clock: a pure description shared by all executors.

Why and how, with an example: ``docs/design.md``, "The schedule".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Action",
    "Op",
    "delay",
    "ddg_actions",
    "dni_actions",
    "ddg_schedule",
    "dni_schedule",
    "num_clocks",
    "format_table",
    "validate_ddg",
    "ACTIONS",
]

Op = Literal["F", "B", "S", "G"]
OP_NAMES = {"F": "forward", "B": "backward", "S": "step", "G": "gradient-model update"}


@dataclass(frozen=True, order=True)
class Action:
    """One unit of work: stage ``stage`` runs ``op`` on minibatch ``minibatch``."""

    stage: int
    op: Op
    minibatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.op}{self.minibatch}"


def delay(stage: int, stages: int) -> int:
    """Clocks between a minibatch's forward and its backward at ``stage`` (d_k = K-1-k)."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is outside 0..{stages - 1}")
    return stages - 1 - stage


def ddg_actions(
    stage: int, stages: int, clock: int, minibatches: int | None = None
) -> list[Action]:
    """Ordered actions of ``stage`` at ``clock``.

    ``minibatches`` is the total number fed to the pipeline once it is known (the drain);
    ``None`` means the stream goes on, so there is a forward at every clock.
    """
    d = delay(stage, stages)
    actions = []
    if minibatches is None or clock < minibatches:
        actions.append(Action(stage, "F", clock))
    backward = clock - d
    if backward >= 0 and (minibatches is None or backward < minibatches):
        actions += [Action(stage, "B", backward), Action(stage, "S", backward)]
    return actions


def dni_actions(
    stage: int, stages: int, clock: int, minibatches: int | None = None
) -> list[Action]:
    """Ordered actions of a DNI stage: update now from a synthetic gradient, learn it later."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is outside 0..{stages - 1}")
    actions = []
    if minibatches is None or clock < minibatches:
        actions += [Action(stage, "F", clock), Action(stage, "B", clock), Action(stage, "S", clock)]
    learned = clock - 1
    if stage < stages - 1 and learned >= 0 and (minibatches is None or learned < minibatches):
        actions.append(Action(stage, "G", learned))
    return actions


def num_clocks(stages: int, minibatches: int, method: str = "ddg") -> int:
    """Clocks needed to feed ``minibatches`` and drain: T + K - 1 for DDG, T + 1 for DNI."""
    if method == "ddg":
        return minibatches + stages - 1
    if method == "dni":
        return minibatches + (1 if stages > 1 else 0)
    raise ValueError(f"unknown method {method!r}")


ActionsAt = Callable[[int, int, int, "int | None"], list[Action]]

ACTIONS: dict[str, ActionsAt] = {"ddg": ddg_actions, "dni": dni_actions}
"""The per-stage, per-clock action function of each pipelined method."""


def _schedule(actions_at: ActionsAt, method: str, stages: int, minibatches: int):
    if stages < 1 or minibatches < 0:
        raise ValueError(f"need stages >= 1 and minibatches >= 0 (got {stages}, {minibatches})")
    return [
        [actions_at(k, stages, c, minibatches) for k in range(stages)]
        for c in range(num_clocks(stages, minibatches, method))
    ]


def ddg_schedule(stages: int, minibatches: int) -> list[list[list[Action]]]:
    """The whole DDG run as ``schedule[clock][stage] -> ordered actions``, drain included."""
    return _schedule(ddg_actions, "ddg", stages, minibatches)


def dni_schedule(stages: int, minibatches: int) -> list[list[list[Action]]]:
    """The whole DNI run as ``schedule[clock][stage] -> ordered actions``."""
    return _schedule(dni_actions, "dni", stages, minibatches)


def format_table(schedule: list[list[list[Action]]]) -> str:
    """A clock-by-stage text table, the picture from pipeline papers in characters."""
    stages = len(schedule[0]) if schedule else 0
    cells = [[" ".join(map(str, acts)) for acts in clock] for clock in schedule]
    widths = [max([len(f"stage {k}")] + [len(row[k]) for row in cells]) for k in range(stages)]
    header = ["clock"] + [f"stage {k}".ljust(w) for k, w in enumerate(widths)]
    lines = [" | ".join(header).rstrip()]
    for c, row in enumerate(cells):
        parts = [str(c).ljust(5)] + [cell.ljust(w) for cell, w in zip(row, widths)]
        lines.append(" | ".join(parts).rstrip())
    return "\n".join(lines)


def validate_ddg(schedule: list[list[list[Action]]]) -> None:
    """Check the data dependencies a DDG executor relies on; raise ``AssertionError`` if broken.

    * stage k's forward of t runs at the clock stage k-1's forward of t ran (same clock,
      later in the sequential order);
    * stage k's backward of t comes one clock after stage k+1's backward of t (its gradient);
    * every minibatch is forwarded, backpropagated and stepped exactly once per stage.
    """
    where: dict[tuple[int, str, int], int] = {}
    for clock, per_stage in enumerate(schedule):
        for acts in per_stage:
            for a in acts:
                key = (a.stage, a.op, a.minibatch)
                assert key not in where, f"{a} appears twice"
                where[key] = clock
    stages = len(schedule[0]) if schedule else 0
    forwards = {m for (k, op, m) in where if op == "F" and k == 0}
    for m in forwards:
        for k in range(stages):
            for op in "FBS":
                assert (k, op, m) in where, f"{k}{op}{m} never runs"
            if k > 0:
                assert where[(k, "F", m)] == where[(k - 1, "F", m)], f"{k}F{m} not with {k - 1}F{m}"
            if k < stages - 1:
                assert where[(k, "B", m)] == where[(k + 1, "B", m)] + 1, f"{k}B{m} mistimed"
            assert where[(k, "S", m)] == where[(k, "B", m)], f"{k}S{m} not with {k}B{m}"
