"""Choosing the runtime's cut by timing real pipelines: the candidates, agreement between
ranks, and that the timing runs leave the training bitwise what it would have been."""


import os

import pytest
import torch
from torch import nn

import ddgpipe
from ddgpipe.balance.timed import BALANCED, NOISE, candidate_splits, cut_name, fastest_cut
from ddgpipe.methods.dni import DNI
from ddgpipe.runtime.launch import run_workers
from tests.helpers import batches, conv_block, pool_head, sgd
from tests.runtime_helpers import (
    assert_runtime_matches_reference,
    local_stage_arrays,
    run_clocks,
)


def test_candidates_move_one_cut_by_one_block_and_stay_valid():
    assert candidate_splits([4], 8) == [[4], [3], [5]]
    assert candidate_splits([1], 3) == [[1], [2]]  # [0] would leave stage 0 empty
    assert candidate_splits([2, 3], 5) == [[2, 3], [1, 3], [2, 4]]  # [3, 3], [2, 2] are not cuts
    assert candidate_splits([1], 2) == [[1]]


def make_model():
    """Dropout in several stages makes the RNG matter, BatchNorm the running statistics."""
    torch.manual_seed(0)
    return nn.Sequential(
        conv_block(1, 8, batchnorm=True, dropout=0.1),
        conv_block(8, 8, batchnorm=True),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Dropout(0.3), nn.ReLU()),
        conv_block(8, 16, stride=2),
        pool_head(16, dropout=0.1),
    )


optimizer = sgd(weight_decay=0.0)


def build(method, stages, **kwargs):
    model = make_model()
    torch.manual_seed(7)  # the RNG the training starts from; the tuning must leave it so
    if method == "dni":
        return DNI(model, stages, optimizer, peer_timeout_s=30, **kwargs)
    return ddgpipe.DDG(model, stages, optimizer, peer_timeout_s=30, **kwargs)


def tuned_worker(rank, world, method, clocks):
    pipe = build(method, world, balance="pipeline", sample_input=batches(1)[0][0])
    losses = run_clocks(pipe, rank, world, batches(clocks))
    state = local_stage_arrays(pipe)
    return {"split": pipe.executor.split, "tuning": pipe.executor.split_tuning,
            "losses": losses, "state": state}


def assert_kept_by_the_rule(tuning: dict, split: list[int]) -> bool:
    """The kept cut is the fastest, or a better-balanced one within the clocks' noise of an
    imbalanced fastest (:func:`fastest_cut`'s rule), as its record says."""
    clock, apart, spread = tuning["clock_ms"], tuning["imbalance"], tuning["spread"]
    kept, fastest = cut_name(split), min(clock, key=clock.get)
    if kept != fastest:
        assert apart[fastest] > BALANCED and apart[kept] < apart[fastest]
        assert clock[kept] <= clock[fastest] * (1 + max(NOISE, spread[fastest], spread[kept]))
        assert tuning["chosen_by"].startswith("better balanced")
    else:
        assert tuning["chosen_by"] == "fastest clock"
    assert all(len(b) == len(split) + 1 and min(b) > 0 for b in tuning["busy_ms"].values())
    return True


def fake_timings(clock: dict, busy: dict):
    return lambda cut: (clock[cut_name(cut)], busy[cut_name(cut)])


def test_the_fastest_cut_wins_when_its_stages_are_balanced():
    clock = {"4": 1.00, "3": 1.01, "5": 1.20}
    busy = {"4": [0.95, 0.90], "3": [0.99, 0.98], "5": [1.1, 0.5]}
    split, timings = fastest_cut([4], 8, fake_timings(clock, busy))
    assert split == [4] and timings["chosen_by"] == "fastest clock"


def test_an_imbalanced_fastest_cut_yields_to_a_balanced_near_tie():
    """[6] is 1% faster but its stage 1 idles 36% of each clock; [5] is a tie and balanced."""
    clock = {"6": 0.477, "5": 0.482, "7": 0.511}
    busy = {"6": [0.488, 0.296], "5": [0.470, 0.455], "7": [0.50, 0.20]}
    split, timings = fastest_cut([6], 11, fake_timings(clock, busy))
    assert split == [5] and timings["chosen_by"].startswith("better balanced than 6")
    assert timings["imbalance"]["5"] < BALANCED < timings["imbalance"]["6"]


def test_a_balanced_cut_that_is_clearly_slower_does_not_win():
    clock = {"6": 0.40, "5": 0.48, "7": 0.50}
    busy = {"6": [0.39, 0.25], "5": [0.47, 0.46], "7": [0.49, 0.2]}
    assert fastest_cut([6], 11, fake_timings(clock, busy))[0] == [6]


@pytest.mark.parametrize("method,stages", [
    ("ddg", 2), pytest.param("ddg", 3, marks=pytest.mark.slow),
    pytest.param("dni", 2, marks=pytest.mark.slow)])
def test_tuned_cut_is_agreed_and_training_matches_the_reference_bitwise(method, stages):
    clocks = 6
    results = run_workers(tuned_worker, stages, (method, clocks), timeout_s=120, threads=1)
    split = results[0]["split"]
    assert all(r["split"] == split for r in results)
    tuning = results[0]["tuning"]
    assert all(r["tuning"] == tuning for r in results)
    timed = {tuple(int(i) for i in k.split(",")): ms for k, ms in tuning["clock_ms"].items()}
    assert tuple(tuning["profiled_split"]) in timed and tuple(split) in timed
    assert_kept_by_the_rule(tuning, split)
    assert all(ms > 0 for ms in timed.values())

    assert_runtime_matches_reference(results, lambda: build(method, stages, split=split,
                                                            executor="reference"),
                                     batches(clocks))


@pytest.mark.slow
@pytest.mark.parametrize("method,stages", [("ddg", 2), ("ddg", 3), ("dni", 2)])
def test_threaded_tuning_times_thread_pipelines_and_leaves_training_as_it_was(method, stages):
    """The threaded executor's timed cut: the candidates ran as thread pipelines on copies,
    and the training that follows is bitwise the reference's with that cut."""
    torch.set_num_threads(1)
    try:
        tuned = build(method, stages, balance="pipeline", executor="threads", threads=1,
                      sample_input=batches(1)[0][0])
        split, tuning = tuned.executor.split, tuned.executor.split_tuning
        timed = {tuple(int(i) for i in k.split(",")): ms for k, ms in tuning["clock_ms"].items()}
        assert tuple(tuning["profiled_split"]) in timed and tuple(split) in timed
        assert_kept_by_the_rule(tuning, split) and len(timed) > 1
        losses = run_clocks(tuned, 0, 1, batches(6))
        reference = build(method, stages, split=split, executor="reference")
        assert run_clocks(reference, 0, 1, batches(6)) == losses
        for a, b in zip(tuned.model.state_dict().values(), reference.model.state_dict().values()):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


@pytest.mark.slow
def test_the_timed_cut_is_remembered_per_machine(monkeypatch, tmp_path):
    """Same model, schedule and machine: the second pipeline reuses the first one's timed
    cut instead of timing again (same seed, same numbers); balance="pipeline" re-times."""
    import ddgpipe.runtime.build as build_module
    from ddgpipe.cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    x = batches(1)[0][0]
    first = build("ddg", 3, sample_input=x, executor="reference", threads=1)
    assert (tmp_path / "cuts.json").exists()
    timed = []
    real = build_module.fastest_cut
    monkeypatch.setattr(build_module, "fastest_cut",
                        lambda *a, **k: timed.append(1) or real(*a, **k))
    again = build("ddg", 3, sample_input=x, executor="threads", threads=1)
    assert again.executor.split == first.executor.split and timed == []
    other_schedule = build("ddg", 3, sample_input=x, executor="threads", threads=1,
                           stash="recompute")
    assert len(timed) == 1  # another schedule: timed once
    build("ddg", 3, sample_input=x, executor="threads", threads=1, balance="pipeline")
    assert len(timed) == 2  # asked to time: timed again
    for pipe in (first, again, other_schedule):
        pipe.close()
