"""The pure schedule, pinned against literal lists."""

import pytest

from ddgpipe.core.schedule import (
    DDGSchedule,
    ScheduleError,
    ddg_actions,
    ddg_schedule,
    delay,
    dni_schedule,
    format_table,
    num_clocks,
    validate_ddg,
)
from ddgpipe.errors import UsageError


def as_text(schedule):
    return [[" ".join(map(str, acts)) for acts in clock] for clock in schedule]


def test_k1_is_backprop():
    assert as_text(ddg_schedule(1, 3)) == [["0F0 0B0 0S0"], ["0F1 0B1 0S1"], ["0F2 0B2 0S2"]]


def test_k2_literal():
    assert as_text(ddg_schedule(2, 3)) == [
        ["0F0", "1F0 1B0 1S0"],
        ["0F1 0B0 0S0", "1F1 1B1 1S1"],
        ["0F2 0B1 0S1", "1F2 1B2 1S2"],
        ["0B2 0S2", ""],
    ]


def test_k3_literal_warmup_and_drain():
    assert as_text(ddg_schedule(3, 3)) == [
        ["0F0", "1F0", "2F0 2B0 2S0"],
        ["0F1", "1F1 1B0 1S0", "2F1 2B1 2S1"],
        ["0F2 0B0 0S0", "1F2 1B1 1S1", "2F2 2B2 2S2"],
        ["0B1 0S1", "1B2 1S2", ""],
        ["0B2 0S2", "", ""],
    ]


def test_streaming_has_forward_every_clock():
    assert [str(a) for a in ddg_actions(0, 4, 2)] == ["0F2"]
    assert [str(a) for a in ddg_actions(0, 4, 3)] == ["0F3", "0B0", "0S0"]


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("minibatches", [0, 1, 2, 5, 9])
def test_dependencies_hold(stages, minibatches):
    schedule = ddg_schedule(stages, minibatches)
    assert len(schedule) == num_clocks(stages, minibatches)
    validate_ddg(schedule)


def test_validate_catches_a_broken_schedule():
    schedule = ddg_schedule(2, 2)
    schedule[1][0], schedule[2][0] = schedule[2][0], schedule[1][0]
    with pytest.raises(ScheduleError):
        validate_ddg(schedule)


def test_delays():
    assert [delay(k, 4) for k in range(4)] == [3, 2, 1, 0]
    with pytest.raises(ValueError):
        delay(4, 4)


def test_dni_literal():
    assert as_text(dni_schedule(2, 2)) == [
        ["0F0 0B0 0S0", "1F0 1B0 1S0"],
        ["0F1 0B1 0S1 0G0", "1F1 1B1 1S1"],
        ["0G1", ""],
    ]


def test_table_renders():
    table = format_table(ddg_schedule(2, 2))
    assert table.splitlines()[0].startswith("clock | stage 0")
    assert "0F1 0B0 0S0" in table


# --- microbatched DDG: M clocks feed one step --------------------------------------------


def test_microbatched_k2_m2_literal():
    """Two minibatches of two microbatches: each stage steps at the clocks closing a step
    (1, 3), stage 0 once more in the drain on what is left."""
    assert as_text(DDGSchedule(2, microbatches=2).table(4)) == [
        ["0F0", "1F0 1B0"],
        ["0F1 0B0 0S0", "1F1 1B1 1S1"],
        ["0F2 0B1", "1F2 1B2"],
        ["0F3 0B2 0S2", "1F3 1B3 1S3"],
        ["0B3 0S3", ""],
    ]


def test_microbatched_k3_m2_literal():
    """Stage 0 (d = 2 = M) has no gradient at clock 1, so it does not step there."""
    assert as_text(DDGSchedule(3, microbatches=2).table(4)) == [
        ["0F0", "1F0", "2F0 2B0"],
        ["0F1", "1F1 1B0 1S0", "2F1 2B1 2S1"],
        ["0F2 0B0", "1F2 1B1", "2F2 2B2"],
        ["0F3 0B1 0S1", "1F3 1B2 1S2", "2F3 2B3 2S3"],
        ["0B2", "1B3 1S3", ""],
        ["0B3 0S3", "", ""],
    ]


def test_microbatched_m1_is_ddg():
    for stages in (1, 2, 4):
        assert DDGSchedule(stages, microbatches=1).table(6) == ddg_schedule(stages, 6)


@pytest.mark.parametrize("stages, microbatches", [(1, 3), (2, 2), (3, 2), (4, 3), (5, 2)])
def test_microbatched_steps_learn_what_the_semantics_say(stages, microbatches):
    """Stage k's step s learns from microbatches sM - d_k .. sM + M - 1 - d_k (those that
    exist), the drain's last step from what is left; the LR advances once per M clocks."""
    schedule, total = DDGSchedule(stages, microbatches=microbatches), 4 * microbatches
    for k in range(stages):
        d, learned, steps = schedule.delay(k), [], []
        for clock in range(schedule.clocks(total)):
            for a in schedule.actions(k, clock, total):
                if a.op == "B":
                    learned.append(a.minibatch)
                elif a.op == "S":
                    steps.append(learned)
                    learned = []
        assert learned == []
        expected = [[m for m in range(s * microbatches - d, (s + 1) * microbatches - d)
                     if 0 <= m < total] for s in range(total // microbatches + stages)]
        assert steps == [ms for ms in expected if ms]
    assert [schedule.ends_step(c) for c in range(4)] == \
        [(c + 1) % microbatches == 0 for c in range(4)]


def test_microbatched_stale_steps_and_knob():
    schedule = DDGSchedule(5, microbatches=2)
    assert [schedule.stale_steps(k) for k in range(5)] == [2, 2, 1, 1, 0]
    assert schedule.cut_fields()["microbatches"] == 2
    assert "microbatches" not in DDGSchedule(5).cut_fields()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match="microbatches"):
            DDGSchedule(2, microbatches=bad)


def test_microbatched_table_renders():
    lines = format_table(DDGSchedule(3, microbatches=2).table(4)).splitlines()
    assert lines[4].split("|")[1].split() == ["0F3", "0B1", "0S1"]
