"""Cutting a Sequential into stages: exact balance, hand splits, and the errors users hit."""

import itertools

import pytest
import torch
from torch import nn

import ddgpipe
from ddgpipe.balance.partition import (
    balanced_split,
    param_costs,
    partition,
    profile_costs,
    stage_costs,
)
from ddgpipe.errors import UsageError
from ddgpipe.losses import token_cross_entropy


def brute_force_best(costs, stages):
    n = len(costs)
    return min(
        max(stage_costs(costs, list(cuts)))
        for cuts in itertools.combinations(range(1, n), stages - 1)
    )


@pytest.mark.parametrize("seed", range(20))
def test_balanced_split_is_optimal(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 10, (1,), generator=gen))
    costs = torch.randint(1, 50, (n,), generator=gen).tolist()
    for stages in range(1, n + 1):
        cuts = balanced_split(costs, stages)
        assert len(cuts) == stages - 1 and cuts == sorted(set(cuts))
        assert all(0 < c < n for c in cuts)
        assert max(stage_costs(costs, cuts)) == brute_force_best(costs, stages)


def test_balanced_split_known_case():
    assert balanced_split([1, 1, 1, 1, 10, 1, 1], 3) == [4, 5]
    assert balanced_split([5, 5, 5, 5], 2) == [2]


def make_model(blocks=6):
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(blocks)])


def test_partition_shares_parameters_and_composes():
    model = make_model()
    parts = partition(model, 3, split=[1, 4])
    assert [len(p) for p in parts] == [1, 3, 2]
    assert parts[1][0] is model[1]
    x = torch.randn(2, 4)
    y = x
    for p in parts:
        y = p(y)
    assert torch.equal(y, model(x))


def test_partition_by_params_balances_resnet():
    from ddgpipe.models import build_model

    model = build_model("resnet20", 1, 8)
    parts = partition(model, 4)
    costs = [sum(p.numel() for p in part.parameters()) for part in parts]
    assert sum(len(p) for p in parts) == len(model)
    assert max(costs) <= 1.2 * sum(costs) / 4


def test_profile_costs_leaves_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.BatchNorm1d(64), nn.Linear(64, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sample = torch.randn(8, 4)
    rng = torch.get_rng_state()
    costs = profile_costs(model, sample, repeats=2, warmup=1)
    assert len(costs) == 3 and all(c > 0 for c in costs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    parts = partition(model, 2, balance="time", sample_input=torch.randn(8, 4))
    assert len(parts) == 2


def test_param_costs_count_parameter_free_blocks_as_one():
    assert param_costs(nn.Sequential(nn.ReLU(), nn.Linear(2, 3))) == [1.0, 9.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stages=0), "number of stages must be an integer >= 1, got 0"),
        (dict(stages=7), "cannot cut a model of 6 blocks into 7 stages; pass --stages 6 or fewer"),
        (dict(stages=3, split=[2, 2]), "leaves stage 1 empty"),
        (dict(stages=3, split=[0, 3]), "leaves stage 0 empty"),
        (dict(stages=3, split=[2, 6]), "leaves stage 2 empty"),
        (dict(stages=3, split=[2]), "gives 1 cut points, which makes 2 stages"),
        (dict(stages=2, balance="memory"), "unknown balance 'memory'"),
            (dict(stages=2, balance="flops"), "needs a sample_input"),
        (dict(stages=2, balance="time"), "needs a sample_input"),
    ],
)
def test_partition_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        partition(make_model(), **kwargs)


def test_non_sequential_model_is_refused():
    with pytest.raises(UsageError, match="DDG cuts an nn.Sequential of blocks, but got Linear"):
        partition(nn.Linear(2, 2), 1)


class TokenBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)

    def forward(self, ids):
        return self.embed(ids)


def language_model():
    torch.manual_seed(0)
    return nn.Sequential(TokenBlock(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8),
                         nn.Linear(8, 16))


@pytest.mark.parametrize("balance", ["params", "flops", "time", "pipeline"])
def test_token_ids_can_be_the_sample_input_of_every_balance_mode(balance):
    ids = torch.randint(0, 16, (4, 6))
    pipe = ddgpipe.DDG(language_model(), 2, lambda ps: torch.optim.SGD(ps, lr=0.1),
                       balance=balance, sample_input=ids, executor="reference", threads=1)
    assert len(pipe.split) == 1
    loss = pipe.step(ids, torch.randint(0, 16, (4, 6)), token_cross_entropy)
    assert loss.isfinite()


def tied_model():
    torch.manual_seed(0)
    embed, head = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)
    head.weight = embed.weight  # the tied input/output embedding of a language model
    return nn.Sequential(embed, nn.Linear(8, 8), nn.Linear(8, 8), head)


def test_a_parameter_shared_by_two_stages_is_a_tie_not_a_refusal():
    """Both slices hold it; the tie rule (tests/runtime/test_ties.py) takes it from there."""
    first, second = partition(tied_model(), 2, split=[2])
    assert first.get_parameter("0.weight") is second.get_parameter("3.weight")


def test_a_parameter_shared_within_one_stage_is_fine():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(nn.Linear(4, 4), a, b, nn.Linear(4, 2))
    assert len(partition(model, 2, split=[1])) == 2  # both uses in stage 1
    assert len(partition(tied_model(), 1)) == 1  # K = 1 is backprop: one stage holds all


def test_a_buffer_shared_by_two_stages_is_refused():
    torch.manual_seed(0)
    first, second = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    second.running_mean = first.running_mean
    with pytest.raises(UsageError, match=r"buffer '0.running_mean' of stage 0 is also "
                                         r"'1.running_mean' of stage 1"):
        partition(nn.Sequential(first, second), 2)
