"""The pure schedule, pinned against literal lists."""

import pytest

from ddgpipe.core.schedule import (
    ScheduleError,
    ddg_actions,
    ddg_schedule,
    delay,
    dni_schedule,
    format_table,
    num_clocks,
    validate_ddg,
)


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
