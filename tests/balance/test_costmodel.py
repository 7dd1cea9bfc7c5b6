"""The cost model against cases with known answers."""

import math

import pytest
import torch

from ddgpipe.balance.costmodel import (
    StageTimes,
    allreduce_s,
    predict_ddg,
    predict_replicas,
    simulate_ddg,
)
from ddgpipe.balance.profile import BlockProfile, profile_blocks
from ddgpipe.models import build_model


def test_one_stage_is_backprop():
    assert simulate_ddg([StageTimes(1.0, 2.0)]) == pytest.approx(3.0)


@pytest.mark.parametrize("stages", [2, 3, 4, 8])
def test_balanced_stages_without_communication_give_k_times_backprop(stages):
    times = [StageTimes(1.0, 2.0)] * stages
    assert simulate_ddg(times) == pytest.approx(3.0)


def test_the_slowest_stage_sets_the_clock():
    assert simulate_ddg([StageTimes(1.0, 2.0), StageTimes(2.0, 4.0)]) == pytest.approx(6.0)


def test_recompute_pays_one_more_forward():
    times = [StageTimes(1.0, 2.0)] * 2
    assert simulate_ddg(times, stash="recompute") == pytest.approx(4.0)


def test_slow_links_bound_the_clock():
    # 1 MB per message at 1 MB/s: each clock the stage waits a full second for its input.
    times = [StageTimes(0.1, 0.2, output_bytes=10**6)] * 2
    clock = simulate_ddg(times, bandwidth_bytes_per_s=1e6)
    assert clock > 0.3
    assert simulate_ddg(times, bandwidth_bytes_per_s=math.inf) == pytest.approx(0.3)


def test_prediction_from_blocks_balances_and_scales():
    blocks = [BlockProfile(1.0, 2.0, 100)] * 8
    pred = predict_ddg(blocks, 4, batch_size=64)
    assert pred.split == [2, 4, 6]
    assert pred.clock_s == pytest.approx(6.0)
    assert pred.speedup_vs_backprop == pytest.approx(4.0)
    assert pred.images_per_s == pytest.approx(64 / 6.0)


def test_profile_blocks_measures_every_block():
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 8)
    blocks = profile_blocks(model, torch.randn(16, 1, 8, 8), repeats=1, warmup=0)
    assert len(blocks) == len(model)
    assert all(b.forward_s > 0 and b.backward_s > 0 for b in blocks)
    assert blocks[-1].output_bytes == 16 * 10 * 4
    assert blocks[0].output_bytes == 16 * 16 * 8 * 8 * 4


def test_a_ring_allreduce_moves_2_r_minus_1_over_r_of_the_bytes():
    assert allreduce_s(10**6, 1, 1e6) == 0.0
    assert allreduce_s(10**6, 2, 1e6) == pytest.approx(1.0)
    assert allreduce_s(10**6, 4, 1e6, latency_s=0.01) == pytest.approx(1.5 + 0.06)
    assert allreduce_s(10**6, 16, math.inf) == 0.0


def test_replicas_with_a_free_link_scale_the_batch_perfectly():
    blocks = [BlockProfile(1.0, 2.0, 100, param_bytes=10**6)] * 8
    one = predict_replicas(blocks, 2, 1, batch_size=64)
    four = predict_replicas(blocks, 2, 4, batch_size=64)
    assert one.clock_s == pytest.approx(12.0)
    assert four.clock_s == pytest.approx(3.0)  # each replica computes on 16 of the 64
    assert four.images_per_s == pytest.approx(4 * one.images_per_s)


def test_the_average_hides_behind_the_backward_until_the_link_is_too_slow():
    # one stage, B = 2 s; 4 MB of parameters in 4 buckets of 1 MB; R = 2 moves 4 MB.
    times = [StageTimes(1.0, 2.0, param_bytes=4 << 20)]
    fast = simulate_ddg(times, replicas=2, bandwidth_bytes_per_s=(4 << 20) / 1.0)  # T = 1 s
    assert fast == pytest.approx(3.0 + 0.25)  # only the last bucket is exposed
    slow = simulate_ddg(times, replicas=2, bandwidth_bytes_per_s=(4 << 20) / 4.0)  # T = 4 s
    assert slow == pytest.approx(1.0 + 4.0)  # the step waits for the whole average
    assert simulate_ddg(times, replicas=1, bandwidth_bytes_per_s=1.0) == pytest.approx(3.0)
