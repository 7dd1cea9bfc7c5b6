"""What every stage does at every clock: a pure description shared by all executors.

A :class:`Schedule` is a value made once (validated then) and asked by every consumer: the
executors walk ``actions(stage, clock)``, the drain runs ``clocks(minibatches)`` clocks, the
cost model simulates it. Why and how, with an example: ``docs/design.md``, "The schedule".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

from ddgpipe.errors import UsageError

__all__ = [
    "Action",
    "Op",
    "Schedule",
    "DDGSchedule",
    "DNISchedule",
    "ScheduleError",
    "SCHEDULES",
    "register_schedule",
    "make_schedule",
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

Table = list[list[list["Action"]]]
"""A whole run as ``table[clock][stage] -> ordered actions``."""


@dataclass(frozen=True, order=True)
class Action:
    """One unit of work: stage ``stage`` runs ``op`` on minibatch ``minibatch``."""

    stage: int
    op: Op
    minibatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.op}{self.minibatch}"


class ScheduleError(ValueError):
    """A schedule breaks a data dependency its executors rely on."""


@dataclass(frozen=True)
class Schedule:
    """The actions of a pipeline of ``stages`` stages, clock by clock (one base for all).

    A subclass gives :meth:`actions`, :meth:`clocks` and :meth:`delay`; its knobs are more
    dataclass fields, checked in :meth:`check`. Executors never ask which schedule it is, only
    what it does: :attr:`checkpoints` and :attr:`averages_replicas` say what it supports.
    """

    stages: int

    #: the registry key, also the "method" of a remembered cut (:mod:`ddgpipe.balance.cutcache`)
    name: ClassVar[str] = ""
    #: whether a pipeline between two clocks can be saved and resumed
    checkpoints: ClassVar[bool] = False
    #: whether replicas may average a stage's gradients between its B and S
    averages_replicas: ClassVar[bool] = False
    #: whether a parameter tied across stages steps with the sum of its uses' gradients
    #: at every clock (:mod:`ddgpipe.core.ties`)
    sums_tied_gradients: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse knobs no pipeline can run (UsageError naming the knob and the fix)."""
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise UsageError(f"the number of stages must be an integer >= 1, got {self.stages!r}")

    def actions(self, stage: int, clock: int, minibatches: int | None = None) -> list[Action]:
        """Ordered actions of ``stage`` at ``clock``. ``minibatches`` is the total fed once it
        is known (the drain); None means the stream goes on."""
        raise NotImplementedError

    def clocks(self, minibatches: int) -> int:
        """Clocks needed to feed ``minibatches`` and drain."""
        raise NotImplementedError

    def delay(self, stage: int) -> int:
        """Clocks between a minibatch's forward and its backward at ``stage``."""
        raise NotImplementedError

    def ends_step(self, clock: int) -> bool:
        """Whether ``clock`` closes an optimizer step: the LR schedule advances after it
        (every clock, unless several clocks feed one step)."""
        return True

    def cut_fields(self) -> dict[str, object]:
        """What a remembered timed cut depends on in this schedule (a knob adds its field
        only where it differs from the plain schedule, so the keys of before still hit)."""
        return {"stages": self.stages, "method": self.name}

    def table(self, minibatches: int) -> Table:
        """The whole run, drain included, as ``table[clock][stage] -> ordered actions``."""
        if minibatches < 0:
            raise ValueError(f"need minibatches >= 0 (got {minibatches})")
        return [[self.actions(k, c, minibatches) for k in range(self.stages)]
                for c in range(self.clocks(minibatches))]

    def _check_stage(self, stage: int) -> None:
        if not 0 <= stage < self.stages:
            raise ValueError(f"stage {stage} is outside 0..{self.stages - 1}")


SCHEDULES: dict[str, type[Schedule]] = {}
"""Every schedule class by its name."""


def register_schedule(cls: type[Schedule]) -> type[Schedule]:
    """Class decorator: make ``cls`` known by its ``name`` to :func:`make_schedule`."""
    if not cls.name or cls.name in SCHEDULES:
        raise ValueError(f"schedule {cls.__name__} needs a name of its own (got {cls.name!r})")
    SCHEDULES[cls.name] = cls
    return cls


def make_schedule(name: str, stages: int, **knobs: object) -> Schedule:
    """The schedule registered as ``name`` for ``stages`` stages, with its ``knobs``."""
    if name not in SCHEDULES:
        raise UsageError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](stages, **knobs)


@register_schedule
@dataclass(frozen=True)
class DDGSchedule(Schedule):
    """DDG: at clock t stage k runs F t, then B of t - d_k (d_k = K-1-k), then S if a step ends.

    With ``microbatches`` M > 1 each clock feeds one microbatch, M of them per minibatch, and
    a stage steps once per M clocks (at clocks sM + M - 1) with the mean of the gradients its
    backwards summed since its last step; the drain ends with a step on what is left. M = 1 is
    the paper's DDG, a step after every backward. See ``docs/design.md``, "Microbatched DDG".
    """

    microbatches: int = 1

    name: ClassVar[str] = "ddg"
    checkpoints: ClassVar[bool] = True
    averages_replicas: ClassVar[bool] = True
    sums_tied_gradients: ClassVar[bool] = True

    def check(self) -> None:
        super().check()
        m = self.microbatches
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise UsageError(f"microbatches must be an integer >= 1, got {m!r}; 1 feeds each "
                             "minibatch whole")

    def delay(self, stage: int) -> int:
        self._check_stage(stage)
        return self.stages - 1 - stage

    def stale_steps(self, stage: int) -> int:
        """The most optimizer steps a gradient of ``stage`` is stale: ceil(d_k / M)."""
        return -(-self.delay(stage) // self.microbatches)

    def clocks(self, minibatches: int) -> int:
        """T + K - 1: the last minibatch's backward reaches stage 0 K - 1 clocks after."""
        return minibatches + self.stages - 1

    def ends_step(self, clock: int) -> bool:
        return (clock + 1) % self.microbatches == 0

    def steps_after(self, stage: int, minibatch: int, minibatches: int | None) -> bool:
        """Whether ``stage`` steps its optimizer right after the backward of ``minibatch``:
        at a clock closing a step, and after the last backward of the drain."""
        return self.ends_step(minibatch + self.delay(stage)) or minibatch + 1 == minibatches

    def cut_fields(self) -> dict[str, object]:
        fields = super().cut_fields()
        return fields if self.microbatches == 1 else fields | {"microbatches": self.microbatches}

    def actions(self, stage: int, clock: int, minibatches: int | None = None) -> list[Action]:
        backward = clock - self.delay(stage)
        actions = []
        if minibatches is None or clock < minibatches:
            actions.append(Action(stage, "F", clock))
        if backward >= 0 and (minibatches is None or backward < minibatches):
            actions.append(Action(stage, "B", backward))
            if self.steps_after(stage, backward, minibatches):
                actions.append(Action(stage, "S", backward))
        return actions


@register_schedule
@dataclass(frozen=True)
class DNISchedule(Schedule):
    """DNI: at clock t stage k runs F, B (synthetic gradient) and S of t, then G of t - 1 (it
    learns its gradient model from the true gradient stage k+1 sent back a clock later)."""

    name: ClassVar[str] = "dni"

    def delay(self, stage: int) -> int:
        self._check_stage(stage)
        return 0

    def clocks(self, minibatches: int) -> int:
        """T + 1: the last gradient-model update a clock after the last minibatch (K > 1)."""
        return minibatches + (1 if self.stages > 1 else 0)

    def actions(self, stage: int, clock: int, minibatches: int | None = None) -> list[Action]:
        self._check_stage(stage)
        actions = []
        if minibatches is None or clock < minibatches:
            actions += [Action(stage, "F", clock), Action(stage, "B", clock),
                        Action(stage, "S", clock)]
        learned = clock - 1
        if stage < self.stages - 1 and learned >= 0 and \
                (minibatches is None or learned < minibatches):
            actions.append(Action(stage, "G", learned))
        return actions


# --- the functions of before the Schedule value: thin wrappers over it ---------------------


def _schedule_of(name: str, stages: int) -> Schedule:
    """A schedule for the wrappers below, which raised ValueError for bad stage counts."""
    if stages < 1:
        raise ValueError(f"need stages >= 1 (got {stages})")
    return SCHEDULES[name](stages)


def delay(stage: int, stages: int) -> int:
    """Clocks between a minibatch's forward and its backward at ``stage`` (d_k = K-1-k)."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is outside 0..{stages - 1}")
    return DDGSchedule(stages).delay(stage)


def ddg_actions(stage: int, stages: int, clock: int,
                minibatches: int | None = None) -> list[Action]:
    """Ordered actions of DDG's ``stage`` at ``clock`` (see :meth:`Schedule.actions`)."""
    return _schedule_of(DDGSchedule.name, stages).actions(stage, clock, minibatches)


def dni_actions(stage: int, stages: int, clock: int,
                minibatches: int | None = None) -> list[Action]:
    """Ordered actions of a DNI stage: update now from a synthetic gradient, learn it later."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is outside 0..{stages - 1}")
    return DNISchedule(stages).actions(stage, clock, minibatches)


def num_clocks(stages: int, minibatches: int, method: str = DDGSchedule.name) -> int:
    """Clocks needed to feed ``minibatches`` and drain: T + K - 1 for DDG, T + 1 for DNI."""
    if method not in SCHEDULES:
        raise ValueError(f"unknown method {method!r}")
    return _schedule_of(method, stages).clocks(minibatches)


ActionsAt = Callable[[int, int, int, "int | None"], list[Action]]

ACTIONS: dict[str, ActionsAt] = {DDGSchedule.name: ddg_actions, DNISchedule.name: dni_actions}
"""The per-stage, per-clock action function of each pipelined method."""


def _table(name: str, stages: int, minibatches: int) -> Table:
    if stages < 1 or minibatches < 0:
        raise ValueError(f"need stages >= 1 and minibatches >= 0 (got {stages}, {minibatches})")
    return SCHEDULES[name](stages).table(minibatches)


def ddg_schedule(stages: int, minibatches: int) -> Table:
    """The whole DDG run as ``schedule[clock][stage] -> ordered actions``, drain included."""
    return _table(DDGSchedule.name, stages, minibatches)


def dni_schedule(stages: int, minibatches: int) -> Table:
    """The whole DNI run as ``schedule[clock][stage] -> ordered actions``."""
    return _table(DNISchedule.name, stages, minibatches)


def format_table(schedule: Table) -> str:
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


def _require(holds: bool, broken: str) -> None:
    if not holds:
        raise ScheduleError(broken)


def _clock_of_each_action(schedule: Table) -> dict[tuple[int, str, int], int]:
    where: dict[tuple[int, str, int], int] = {}
    for clock, per_stage in enumerate(schedule):
        for acts in per_stage:
            for a in acts:
                key = (a.stage, a.op, a.minibatch)
                _require(key not in where, f"{a} appears twice")
                where[key] = clock
    return where


def validate_ddg(schedule: Table) -> None:
    """Check the data dependencies a DDG executor relies on; raise :class:`ScheduleError`
    naming the first one broken.

    * stage k's forward of t runs at the clock stage k-1's forward of t ran (same clock,
      later in the sequential order);
    * stage k's backward of t comes one clock after stage k+1's backward of t (its gradient);
    * every minibatch is forwarded, backpropagated and stepped exactly once per stage.
    """
    where = _clock_of_each_action(schedule)
    stages = len(schedule[0]) if schedule else 0
    forwards = {m for (k, op, m) in where if op == "F" and k == 0}
    for m in forwards:
        for k in range(stages):
            for op in "FBS":
                _require((k, op, m) in where, f"{k}{op}{m} never runs")
            if k > 0:
                _require(where[(k, "F", m)] == where[(k - 1, "F", m)],
                         f"{k}F{m} not with {k - 1}F{m}")
            if k < stages - 1:
                _require(where[(k, "B", m)] == where[(k + 1, "B", m)] + 1, f"{k}B{m} mistimed")
            _require(where[(k, "S", m)] == where[(k, "B", m)], f"{k}S{m} not with {k}B{m}")
