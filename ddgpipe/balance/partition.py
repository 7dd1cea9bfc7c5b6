"""Cut an ``nn.Sequential`` into K contiguous stages.

Why and how: ``docs/design.md``, "Where to cut: the partition".
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import cast

from torch import nn

from ddgpipe.balance.profile import profile_blocks
from ddgpipe.core.ties import refuse_shared_buffers
from ddgpipe.core.values import Blocks, Value, as_args, check_value, grad_probe, handed_on, leaves
from ddgpipe.errors import UsageError

__all__ = [
    "BALANCE_MODES",
    "partition",
    "choose_split",
    "balanced_split",
    "block_costs",
    "as_blocks",
    "check_model",
    "check_disjoint",
    "check_split",
    "param_costs",
    "flop_costs",
    "profile_costs",
    "stage_costs",
    "cut_points",
]

BALANCE_MODES = ("params", "flops", "time")


def partition(
    model: nn.Sequential,
    stages: int,
    *,
    split: Sequence[int] | None = None,
    balance: str = "params",
    sample_input: Value | None = None,
) -> list[Blocks]:
    """Return ``stages`` slices of ``model`` that share its parameters (each a
    :class:`~ddgpipe.core.values.Blocks`, which passes tuples between its blocks).

    ``split`` gives the cut points as block indices (``[4, 8]`` makes blocks 0-3, 4-7, 8-end);
    without it the cut balances ``balance`` costs ("params", or "time" profiled on
    ``sample_input``).
    """
    blocks = check_model(model, stages)
    if split is not None:
        cuts = check_split(split, stages, blocks)
    else:
        cuts = choose_split(model, stages, balance=balance, sample_input=sample_input)
    bounds = [0, *cuts, blocks]
    items = list(model._modules.items())
    slices = [Blocks(OrderedDict(items[bounds[i]: bounds[i + 1]])) for i in range(stages)]
    refuse_shared_buffers(slices, cuts)  # a shared parameter is a tie (ddgpipe.core.ties)
    return slices


def choose_split(model: nn.Sequential, stages: int, *, balance: str = "params",
                 sample_input: Value | None = None) -> list[int]:
    """The cut points that balance ``balance`` costs over ``stages`` (what :func:`partition`
    cuts at when no ``split`` is given)."""
    check_model(model, stages)
    return balanced_split(block_costs(model, balance, sample_input), stages)


def check_disjoint(stages: Sequence[nn.Module], cuts: Sequence[int] = ()) -> None:
    """Refuse a parameter or buffer that lands in two stages (a tied embedding and output
    projection, say): each stage would apply its own update, at its own delay, to one tensor,
    and stage threads would race on it. Names both uses, the stages and the fixes."""
    seen: dict[int, tuple[int, str]] = {}
    for k, stage in enumerate(stages):
        named = [*stage.named_parameters(remove_duplicate=False),
                 *stage.named_buffers(remove_duplicate=False)]
        for name, tensor in named:
            first = seen.setdefault(id(tensor), (k, name))
            if first[0] == k:
                continue
            kind = "parameter" if isinstance(tensor, nn.Parameter) else "buffer"
            where = f" (cut at {','.join(map(str, cuts))})" if cuts else ""
            raise UsageError(
                f"{kind} {first[1]!r} of stage {first[0]} is also {name!r} of stage {k}{where}: "
                "one tensor in two stages would get two updates at two different delays (and "
                "two stage threads would race on it); untie it (give each use its own copy, "
                "e.g. a fresh nn.Parameter), or cut the model so that both uses are in one "
                "stage")


def as_blocks(model: nn.Module, stages: int) -> nn.Sequential:
    """``model`` as the ``nn.Sequential`` of blocks it must be, checked for ``stages``."""
    check_model(model, stages)
    return cast(nn.Sequential, model)


def check_model(model: nn.Module, stages: int) -> int:
    """Refuse a model that cannot be cut into ``stages``; return its number of blocks."""
    if not isinstance(model, nn.Sequential):
        raise UsageError(
            f"DDG cuts an nn.Sequential of blocks, but got {type(model).__name__}; wrap the "
            "model's layers in nn.Sequential (the models in ddgpipe.models are built that way)"
        )
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise UsageError(f"the number of stages must be an integer >= 1, got {stages!r}")
    blocks = len(model)
    if stages > blocks:
        raise UsageError(
            f"cannot cut a model of {blocks} blocks into {stages} stages; pass --stages "
            f"{blocks} or fewer"
        )
    return blocks


def block_costs(model: nn.Sequential, balance: str, sample_input: Value | None) -> list[float]:
    """Each block's cost under ``balance``: its parameters, or its profiled seconds."""
    if balance not in BALANCE_MODES:
        raise UsageError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCE_MODES)}")
    if balance == "params":
        return param_costs(model)
    if sample_input is None:
        raise UsageError(f"balance={balance!r} runs the blocks on a sample batch and needs a "
                         "sample_input")
    if balance == "flops":
        return flop_costs(model, sample_input)
    return profile_costs(model, sample_input)


def check_split(split: Sequence[int], stages: int, blocks: int) -> list[int]:
    """Validate hand-given cut points; every stage must keep at least one block."""
    cuts = [int(c) for c in split]
    if len(cuts) != stages - 1:
        raise UsageError(
            f"--split gives {len(cuts)} cut points, which makes {len(cuts) + 1} stages, but "
            f"{stages} stages were asked for; give {stages - 1} cut points"
        )
    bounds = [0, *cuts, blocks]
    for i in range(stages):
        if bounds[i + 1] <= bounds[i]:
            raise UsageError(
                f"--split {','.join(map(str, cuts))} leaves stage {i} empty (blocks "
                f"{bounds[i]}..{bounds[i + 1] - 1}); cut points must increase strictly "
                f"between 1 and {blocks - 1}"
            )
    return cuts


def balanced_split(costs: Sequence[float], stages: int) -> list[int]:
    """Cut points minimising the largest stage cost (exact; ties go to the earliest cut).

    ``best[k][j]`` is the smallest possible maximum stage cost when the first ``j`` blocks
    form ``k`` stages.
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise UsageError(f"cannot cut {n} blocks into {stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    choice = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], choice[k][j] = value, i
    cuts, j = [], n
    for k in range(stages, 1, -1):
        j = choice[k][j]
        cuts.append(j)
    return cuts[::-1]


def cut_points(modules: Sequence[nn.Sequential]) -> list[int]:
    """The ``split`` that reproduces these contiguous stages: the inverse of ``partition``."""
    sizes = [len(m) for m in modules]
    return [sum(sizes[:i]) for i in range(1, len(sizes))]


def stage_costs(costs: Sequence[float], cuts: Sequence[int]) -> list[float]:
    """Sum of block costs per stage for the given cut points."""
    bounds = [0, *cuts, len(costs)]
    return [float(sum(costs[bounds[i]: bounds[i + 1]])) for i in range(len(bounds) - 1)]


def param_costs(model: nn.Sequential) -> list[float]:
    """Trainable parameters per block (at least 1, so parameter-free blocks still count)."""
    return [max(1.0, float(sum(p.numel() for p in b.parameters() if p.requires_grad)))
            for b in model]


def flop_costs(model: nn.Sequential, sample_input: Value) -> list[float]:
    """Floating-point operations of each block's forward and backward on ``sample_input``.

    Counted by ``torch.utils.flop_counter`` (matrix products and convolutions), so the same
    model and batch shape always give the same cut. Weights, statistics and RNG are kept.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from ddgpipe.core.rng import rng_kept

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    costs = []
    try:
        with rng_kept():
            model.train()
            x = sample_input
            for i, block in enumerate(model):
                inp = leaves(handed_on(x, floating=True), grad=i > 0)
                with FlopCounterMode(display=False) as counter:
                    out = check_value(block(*as_args(inp)), f"block {i} ({type(block).__name__})")
                    probe = grad_probe(out)
                    if probe is not None:
                        probe.backward()
                costs.append(max(1.0, float(counter.get_total_flops())))
                x = handed_on(out)
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return costs


def profile_costs(
    model: nn.Sequential, sample_input: Value, repeats: int = 5, warmup: int = 2
) -> list[float]:
    """Median forward+backward seconds of each block on ``sample_input``.

    Each block is timed on the real activation the previous block produces; weights,
    BatchNorm statistics, gradients and the RNG are left as they were.
    """
    blocks = profile_blocks(model, sample_input, repeats=repeats, warmup=warmup)
    return [b.forward_s + b.backward_s for b in blocks]
