"""stage-momentum, delay-lr and accumulate: their errors, their checkpoints, and the stash
sharing one weight version between minibatches while the weights do not change (which
accumulation makes the common case). Their numpy oracles are in
``tests/core/test_compensation_delay.py``; K = 1, the runtimes and resuming are cases of
``tests/core/test_compensation.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ddgpipe
from tests.helpers import resnet, sgd
from tests.oracles import MOMENTUM, momentum_of, oracle_batches, tanh_net, torch_sgd

# --- errors ------------------------------------------------------------------------------------

def build(compensation, optimizer=None, options=None, stages=2):
    return ddgpipe.DDG(resnet(), stages, optimizer or sgd(), compensation=compensation,
                       compensation_options=options, executor="reference")


@pytest.mark.parametrize("kwargs,message", [
    (dict(compensation="stage-momentum", optimizer=sgd(momentum=0.0)),
     "needs SGD with momentum > 0"),
    (dict(compensation="stage-momentum", optimizer=lambda ps: torch.optim.RAdam(ps)),
     "SGD with momentum, Adam, AdamW, NAdam or Muon; got RAdam: use --optimizer nadam"),
    (dict(compensation="stage-momentum", optimizer=sgd(momentum=0.995)),
     "lower --momentum or raise --stage-momentum-max"),
    (dict(compensation="stage-momentum", optimizer=lambda ps: torch.optim.NAdam(
        ps, betas=(0.99, 0.999)), options={"stage_momentum_max": 0.95}),
     "lower --beta1 or raise --stage-momentum-max"),
    (dict(compensation="stage-momentum", options={"stage_momentum_max": 1.0}),
     "stage_momentum_max must be in (0, 1)"),
    (dict(compensation="stage-momentum,sc"), "stage-momentum and sc both set"),
    (dict(compensation="delay-lr", options={"delay_lr_c": 0.0}),
     "delay_lr_c must be a positive number"),
    (dict(compensation="delay-lr,pipemare-lr", options={"pipemare_anneal": 3}),
     "both change the lr phase"),
    (dict(compensation="accumulate", options={"accumulate_steps": 1}),
     "accumulate_steps must be a whole number >= 2 (got 1); 1 is plain DDG"),
    (dict(compensation="accumulate", options={"accumulate_steps": 2.5}),
     "accumulate_steps must be a whole number"),
    (dict(compensation="accumulate,sc"), "accumulate and sc both change the update phase"),
    (dict(compensation="dc", options={"accumulate_steps": 3}),
     "option accumulate_steps only applies to compensation accumulate"),
    (dict(compensation="dc", options={"delay_lr_c": 3}), "only applies to compensation delay-lr"),
])
def test_clear_errors(kwargs, message):
    with pytest.raises(ddgpipe.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(**kwargs)


@pytest.mark.parametrize("args,message", [
    (["--accumulate-steps", "3"], "option accumulate_steps only applies to"),
    (["--compensation", "delay-lr", "--delay-lr-c", "-1"], "delay_lr_c must be a positive"),
    (["--compensation", "stage-momentum", "--momentum", "0"], "needs SGD with momentum > 0"),
    (["--compensation", "stage-momentum", "--stage-momentum-max", "0.5"],
     "lower --momentum or raise --stage-momentum-max"),
])
def test_cli_refuses_bad_settings_before_training(args, message, capsys):
    from ddgpipe.cli import main

    code = main(["train", "--method", "ddg", *args, "--stages", "2", "--no-progress",
                 "--out", "unused"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_cli_trains_with_the_new_rules(tmp_path):
    from ddgpipe.cli import main

    args = ["train", "--model", "mlp", "--data", "digits", "--epochs", "1", "--batch-size",
            "128", "--threads", "1", "--no-progress", "--method", "ddg", "--stages", "3",
            "--compensation", "stage-momentum,delay-lr,accumulate", "--stage-momentum-max",
            "0.95", "--delay-lr-c", "0.5", "--accumulate-steps", "2", "--stop-after", "4",
            "--out", str(tmp_path / "run")]
    assert main(args) == 0
    config = (tmp_path / "run" / "config.json").read_text()
    for option in ('"stage_momentum_max": 0.95', '"delay_lr_c": 0.5', '"accumulate_steps": 2'):
        assert option in config


# --- the stash keeps one weight version while the weights do not change ---------------------

def inflight_versions(pipe, stage=0):
    return len({id(p.weights) for p in pipe.stages[stage].inflight})


@pytest.mark.parametrize("stash", ["graph", "recompute"])
def test_accumulation_shares_weight_versions(stash):
    """K = 4: stage 0 keeps 3 minibatches in flight (after each clock); it steps at clocks
    3, 4, ... in plain DDG, so they hold 3 versions, but with A = 4 only at clock 6 (its
    4th gradient, after that clock's forward): versions change between forwards 6 and 7."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 5, generator=g, dtype=torch.float64),
                torch.randn(4, 3, generator=g, dtype=torch.float64)) for _ in range(10)]
    counts = {}
    for compensation in (None, "accumulate"):
        pipe = ddgpipe.DDG(tanh_net([5, 7, 6, 6, 3], seed=3), 4, torch_sgd(), stash=stash,
                           compensation=compensation, executor="reference")
        seen = []
        for x, y in batches:
            pipe.step(x, y, F.mse_loss)
            seen.append(inflight_versions(pipe))
            if stash == "recompute":  # a version another replay used: no flag, no gradient
                kept = [w for p in pipe.stages[0].inflight for w in p.weights.values()]
                assert all(w.grad is None and not w.requires_grad for w in kept)
        pipe.drain()
        counts[compensation] = seen
    assert counts[None] == [1, 1, 1, 1, 2, 3, 3, 3, 3, 3]
    assert counts["accumulate"] == [1, 1, 1, 1, 1, 1, 1, 2, 2, 1]


def test_fused_optimizers_do_not_share_versions():
    """torch's fused kernels update in place without bumping the version counter the stash
    relies on, so a stage with one copies the weights at every forward."""
    p = torch.nn.Parameter(torch.ones(2, 2))
    p.grad = torch.ones(2, 2)
    before = p._version
    torch.optim.Adam([p], lr=0.1, fused=True).step()
    assert p._version == before and not torch.equal(p.detach(), torch.ones(2, 2))
    pipe = ddgpipe.DDG(tanh_net([5, 7, 6, 3], seed=3), 3,
                       lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True),
                       compensation="accumulate", executor="reference")
    assert not pipe.stages[0].stash.shares_snapshots
    for x, y in oracle_batches(3)[:3]:
        pipe.step(torch.from_numpy(x), torch.from_numpy(y), F.mse_loss)
    assert inflight_versions(pipe) == 2


def test_stage_momentum_is_in_the_checkpoint():
    """The coefficients live in the optimizer's param groups, which checkpoints keep."""
    pipe = ddgpipe.DDG(tanh_net([5, 7, 6, 3], seed=3), 3, torch_sgd(),
                       compensation="stage-momentum", executor="reference")
    for x, y in oracle_batches(3)[:3]:
        pipe.step(torch.from_numpy(x), torch.from_numpy(y), F.mse_loss)
    state = pipe.checkpoint_state()
    for k, stage_state in enumerate(state["stages"]):
        group = stage_state["optimizer"]["param_groups"][0]
        assert group["momentum"] == pytest.approx(momentum_of(MOMENTUM, 2 - k, 3))
        assert group["nesterov"] is (k < 2)
    resumed = ddgpipe.DDG(tanh_net([5, 7, 6, 3], seed=3), 3, torch_sgd(),
                          compensation="stage-momentum", executor="reference")
    resumed.load_checkpoint_state(state)
    assert resumed.stages[0].optimizer.param_groups[0]["momentum"] == \
        pytest.approx(momentum_of(MOMENTUM, 2, 3))
