"""AsyncPP's recipe as ``--preset asyncpp``: its settings, the cosine's floor, and NAdam's
momentum schedule stretched over any length of run.

The reference numbers are AsyncPP's (PluralisResearch/AsyncPP, ``run.bash`` and
``main_with_runtime.py``): 50 epochs of 1000 minibatches, 3000 warm-up steps from 1e-7, cosine
to 0.1 x lr, torch's NAdam with momentum_decay 0.004 and beta1 0.99.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ddgpipe.cli import build_parser, main
from ddgpipe.cli.commands import config_from_args
from ddgpipe.cli.main import parse_args
from ddgpipe.errors import UsageError
from ddgpipe.training import TrainConfig
from ddgpipe.training.assemble import build_method
from ddgpipe.training.optim import lr_factor, schedule_factor
from ddgpipe.training.recipes import (
    ASYNCPP_STEPS,
    momentum_decay_for,
    scaled_momentum_decay,
    warmup_for,
    warmup_iterations,
)

BETA1 = 0.99


def preset_config(*flags: str) -> TrainConfig:
    parser = build_parser()
    argv = ["train", "--preset", "asyncpp", "--model", "gpt-2", "--method", "ddg",
            "--stages", "2", "--executor", "reference", *flags]
    return config_from_args(parse_args(parser, argv))


# --- the preset's settings --------------------------------------------------------------------

def test_preset_sets_asyncpp_recipe_for_the_runs_length():
    config = preset_config("--iterations", "800")
    assert (config.optimizer, config.lr, config.betas, config.weight_decay, config.clip_grad,
            config.lr_schedule, config.lr_floor) == ("nadam", 3e-4, (0.99, 0.999), 0.01, 10.0,
                                                     "cosine", 0.1)
    assert (config.warmup_iters, config.warmup_share, config.nadam_horizon) == (0, 0.06, 50_000)
    assert warmup_for(config, 800) == 48  # 3000 / 50 000 of the run
    assert warmup_for(config, 50_000) == 3000
    assert momentum_decay_for(config, 800) == pytest.approx(0.25)  # 0.004 * 50 000 / 800

    torch.manual_seed(0)
    method = build_method(config, nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), 100, None,
                          total_iterations=800)
    try:
        for stage in method.stages:
            assert isinstance(stage.optimizer, torch.optim.NAdam)
            matrix, vector = stage.optimizer.param_groups
            assert (matrix["betas"], matrix["lr"], matrix["weight_decay"],
                    matrix["decoupled_weight_decay"]) == ((0.99, 0.999), 3e-4 / 48, 0.01, True)
            assert matrix["momentum_decay"] == pytest.approx(0.25)
            assert vector["weight_decay"] == 0.0  # ddgpipe's decay groups: see the docs
            assert stage.clip_grad == 10.0
    finally:
        method.close()


def test_flags_given_explicitly_win_over_the_preset():
    config = preset_config("--iterations", "800", "--lr", "1e-3", "--warmup-iters", "10",
                           "--warmup-share", "0")
    assert (config.lr, config.warmup_iters, warmup_for(config, 800)) == (1e-3, 10, 10)
    assert parse_default("lr_floor") == 0.0 and parse_default("nadam_horizon") is None


def parse_default(name: str):
    return getattr(build_parser().parse_args(["train"]), name)  # the preset does not leak


@pytest.mark.parametrize("flags,message", [
    (["--warmup-iters", "10"], "the warm-up is given twice"),
    (["--optimizer", "adamw"], "--nadam-horizon paces NAdam's momentum schedule"),
    (["--lr-schedule", "multistep"], "--lr-floor is the fraction of the lr cosine ends at"),
    (["--warmup-share", "1.5"], "--warmup-share is the fraction of the run"),
])
def test_preset_refuses_settings_that_contradict_it(flags, message, capsys):
    code = main(["train", "--preset", "asyncpp", "--model", "gpt-2", "--iterations", "50",
                 *flags, "--no-progress", "--out", "unused"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err


def test_preset_trains_a_small_pipeline(tmp_path):
    run = tmp_path / "run"
    code = main(["train", "--preset", "asyncpp", "--model", "gpt-2", "--method", "ddg",
                 "--stages", "2", "--iterations", "12", "--batch-size", "4", "--context", "16",
                 "--width", "32", "--heads", "2", "--threads", "1", "--no-progress",
                 "--out", str(run)])
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["optimizer"], config["lr_floor"], config["nadam_horizon"],
            config["warmup_share"]) == ("nadam", 0.1, 50_000, 0.06)


# --- the cosine's floor -------------------------------------------------------------------------

def asyncpp_lr(it: int, base: float = 3e-4, warmup: int = 3000,
               total: int = ASYNCPP_STEPS) -> float:
    """AsyncPP's adjust_learning_rate, cosine policy with --lr_warmup, written out."""
    if it < warmup:
        return 1e-7 + (base - 1e-7) * (1 + it) / warmup
    ratio = (it - warmup) / (total - warmup)
    floor = 0.1 * base
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * ratio))


def test_the_schedule_is_asyncpps_over_their_run():
    factor = schedule_factor("cosine", 1000, 50, warmup_iters=3000, lr_floor=0.1)
    gaps = [abs(3e-4 * factor(it) - asyncpp_lr(it)) for it in range(0, ASYNCPP_STEPS, 7)]
    assert max(gaps[3000 // 7 + 1:]) < 1e-18  # after the warm-up: the same cosine
    assert max(gaps) <= 1e-7  # the warm-up starts from 0 here, from 1e-7 there


def test_cosine_ends_at_its_floor():
    factor = schedule_factor("cosine", 10, 8, warmup_iters=8, lr_floor=0.1)
    values = [factor(i) for i in range(80)]
    assert values[7] == 1.0 and values[8] == 1.0  # the warm-up's top, the cosine's start
    after = values[8:]
    assert all(a >= b for a, b in zip(after, after[1:])) and min(after) > 0.1
    assert values[79] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 71 / 72)))
    assert lr_factor("cosine", 72, 10, 72, floor=0.1) == pytest.approx(0.1)
    assert lr_factor("cosine", 5, 10, 72, floor=0.0) == 0.5 * (1 + math.cos(math.pi * 5 / 72))


def test_a_floor_outside_cosine_is_refused():
    with pytest.raises(UsageError, match="for --lr-schedule cosine only"):
        schedule_factor("constant", 10, 2, lr_floor=0.1)


# --- NAdam's momentum over the run's length -----------------------------------------------------

def torch_nadam_mus(momentum_decay: float, steps: int) -> list[float]:
    """mu_1 .. mu_T as torch's NAdam computes them: the ratios of its mu_product."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # mu_product in float64
    try:
        p = nn.Parameter(torch.ones(2))
        opt = torch.optim.NAdam([p], lr=1e-3, betas=(BETA1, 0.999),
                                momentum_decay=momentum_decay, decoupled_weight_decay=True)
        products = [1.0]
        for _ in range(steps):
            p.grad = torch.ones(2)
            opt.step()
            products.append(float(opt.state[p]["mu_product"]))
    finally:
        torch.set_default_dtype(saved)
    return [b / a for a, b in zip(products, products[1:])]


def asyncpp_mu(step: float) -> float:
    return BETA1 * (1 - 0.5 * 0.96 ** (step * 0.004))


@pytest.mark.parametrize("steps", [40, 64])
def test_scaled_momentum_decay_follows_asyncpps_mu(steps):
    psi = scaled_momentum_decay(ASYNCPP_STEPS, steps)
    mus = torch_nadam_mus(psi, steps)
    assert mus[-1] == pytest.approx(asyncpp_mu(ASYNCPP_STEPS), rel=1e-12)  # at the run's end
    assert mus[steps // 2 - 1] == pytest.approx(asyncpp_mu(ASYNCPP_STEPS // 2), rel=1e-12)
    assert mus[-1] > 0.98  # the look-ahead arrives; with torch's psi it would not:
    assert torch_nadam_mus(0.004, steps)[-1] < 0.51


def test_warmup_share_rounds_and_leaves_the_run_a_step():
    assert [warmup_iterations(0.06, t) for t in (800, 810, 25, 1)] == [48, 49, 2, 0]
    assert warmup_iterations(0.9, 2) == 1
