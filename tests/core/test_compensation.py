"""Staleness compensation checked against references it cannot fake.

1. Each rule against an independent float64 numpy implementation of its paper's rule: a
   small tanh network, one layer per stage, forward and backward by hand, DDG's delays and
   weight versions, momentum SGD with weight decay and a changing lr; K = 2 and 3, to 1e-10.
2. K = 1 with any compensation is backprop, bitwise.
3. The multi-process runtime equals the reference executor, bitwise, with each one on.
4. Checkpoint/resume mid-pipeline is bitwise the uninterrupted run, compensation state
   included (and the state matters: dropping it changes the weights).
5. Clear errors: unknown names, bp/dni, Adam where a rule needs momentum SGD, stash modes
   where a rule is undefined, conflicting names, options nobody reads.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ddgpipe
from ddgpipe.cli import main
from ddgpipe.runtime.launch import run_workers
from tests.helpers import (
    assert_state_equal,
    batches,
    dropout_convnet,
    dropout_mlp,
    ragged_batches,
    resnet,
    sgd,
    step_lr,
)
from tests.oracle_rules import RULES
from tests.oracles import NpSGD, compensated_ddg, oracle_batches, torch_ddg, torch_sgd
from tests.runtime_helpers import assert_runtime_matches_reference, local_stage_arrays, run_clocks

ANNEAL = 4  # PipeMare's K for the oracle: the lr ramp ends inside the run


# --- 1. the rules, independently in numpy (tests/oracle_rules.py) ----------------------------

def numpy_pipeline(params, minibatches, rule=(), stash="graph"):
    """DDG clock by clock, one layer per stage, momentum SGD with weight decay at lr_t, and
    the named rules (``tests/oracle_rules.py`` writes each out)."""
    return compensated_ddg(params, minibatches, lambda k, d: NpSGD(), [RULES[r] for r in rule],
                           stash=stash, options={"pipemare_anneal": ANNEAL})


def torch_pipeline(stages, minibatches, compensation, stash="graph", options=None):
    return torch_ddg(stages, minibatches, torch_sgd(), compensation, options, stash, float64=False)


ORACLE_CASES = [  # (compensation, stash)
    (None, "graph"), (None, "none"), ("sc", "graph"), ("lwp", "graph"), ("lwp", "none"),
    ("sc,lwp", "graph"), ("dc", "graph"), ("dc-c", "recompute"), ("pipemare-lr", "graph"),
    ("pipemare", "none"),
]


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("compensation,stash", ORACLE_CASES)
def test_rule_matches_independent_numpy(compensation, stash, stages):
    minibatches = oracle_batches(stages)
    options = {"pipemare_anneal": ANNEAL} if compensation and "pipemare" in compensation \
        else None
    start, got = torch_pipeline(stages, minibatches, compensation, stash, options)
    rule = tuple(compensation.split(",")) if compensation else ()
    expected = numpy_pipeline(start, minibatches, rule, stash)
    for (w, b), (ew, eb) in zip(got, expected):
        np.testing.assert_allclose(w, ew, rtol=0, atol=1e-10)
        np.testing.assert_allclose(b, eb, rtol=0, atol=1e-10)
    plain = numpy_pipeline(start, minibatches, (), stash)
    moved = max(np.abs(g[0] - p[0]).max() for g, p in zip(got, plain))
    if compensation == "pipemare-lr" and stages == 2:
        assert moved < 1e-12  # T1 rescales by delay^-p: nothing at delay 1
    elif compensation is not None:
        assert moved > 1e-6, "the compensation did not change the update"


def test_spike_compensation_at_delay_one_is_nesterov():
    """Kosson et al.: for D = 1, a = m and b = 1, PyTorch's Nesterov momentum."""
    from ddgpipe.core.compensation.spike import spike_coefficients

    assert spike_coefficients(0.9, 1) == (0.9, 1.0)
    a, b = spike_coefficients(0.9, 3)
    assert a / (1 - 0.9) + b == pytest.approx(1 / (1 - 0.9))  # the total step is unchanged


# --- 2. K = 1 is backprop --------------------------------------------------------------------

K1_CASES = [("sc", "graph"), ("lwp", "graph"), ("sc,lwp", "graph"), ("dc", "graph"),
            ("dc-c", "recompute"), ("pipemare-lr", "graph"), ("pipemare", "none"),
            ("stage-momentum", "graph"), ("delay-lr", "graph"), ("accumulate", "graph"),
            ("accumulate,dc", "recompute"), ("stage-momentum,delay-lr,accumulate", "none")]


@pytest.mark.parametrize("compensation,stash", K1_CASES)
def test_k1_with_compensation_equals_backprop_bitwise(compensation, stash):
    data = batches(3, sizes=16)
    bp_model, ddg_model = resnet(), resnet()
    bp = ddgpipe.Backprop(bp_model, sgd())
    pipe = ddgpipe.DDG(ddg_model, stages=1, optimizer=sgd(), stash=stash,
                       compensation=compensation, compensation_options={"pipemare_anneal": 2}
                       if "pipemare" in compensation else None)
    for x, y in data:
        assert torch.equal(bp.step(x, y, F.cross_entropy), pipe.step(x, y, F.cross_entropy))
    pipe.drain()
    assert_state_equal(bp_model, ddg_model)


# --- 3. the runtime equals the reference -----------------------------------------------------

RUNTIME_CASES = {  # name -> (compensation, stash, options)
    "sc,lwp": ("sc,lwp", "graph", None),
    "dc": ("dc", "graph", None),
    "dc-c": ("dc-c", "recompute", None),
    "pipemare-lr": ("pipemare-lr", "graph", {"pipemare_anneal": 3}),
    "pipemare": ("pipemare", "none", {"pipemare_anneal": 3}),
    "stage-momentum": ("stage-momentum", "graph", None),
    "delay-lr": ("delay-lr", "graph", {"delay_lr_c": 0.5}),
    # a leftover at the end: finish() runs in the rank, the stage thread, the reference
    "accumulate": ("accumulate", "graph", {"accumulate_steps": 2}),
    "accumulate,dc,delay-lr": ("accumulate,dc,delay-lr", "recompute",
                               {"accumulate_steps": 3, "delay_lr_c": 0.5}),
    "stage-momentum,accumulate": ("stage-momentum,accumulate", "none", None),
}
RUNTIME_CLOCKS = 5


def build_runtime_pipe(case: str, executor: str | None = None, stages: int = 2):
    compensation, stash, options = RUNTIME_CASES[case]
    return ddgpipe.DDG(dropout_convnet(), stages, sgd(), lr_scheduler=step_lr(), stash=stash,
                       compensation=compensation, compensation_options=options,
                       peer_timeout_s=30, executor=executor, threads=1)


def every_case_worker(rank, world):
    """All cases in one process group, one after another: one spawn for the whole test."""
    results = {}
    for case in RUNTIME_CASES:
        pipe = build_runtime_pipe(case)
        losses = run_clocks(pipe, rank, world, ragged_batches(RUNTIME_CLOCKS))
        results[case] = {"state": local_stage_arrays(pipe), "losses": losses}
    return results


@pytest.fixture(scope="module")
def runtime_results():
    return run_workers(every_case_worker, 2, timeout_s=120, threads=1)


@pytest.mark.parametrize("case", list(RUNTIME_CASES))  # one process run, shared
def test_runtime_matches_reference_bitwise(case, runtime_results):
    assert_runtime_matches_reference([r[case] for r in runtime_results],
                                     lambda: build_runtime_pipe(case, "reference"),
                                     ragged_batches(RUNTIME_CLOCKS))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(RUNTIME_CASES))
def test_threads_match_reference_bitwise(case):
    """A thread per stage, with each compensation, at K = 3 (two delayed stages)."""
    runs = []
    for executor in ("reference", "threads"):
        torch.manual_seed(3)
        pipe = build_runtime_pipe(case, executor, stages=3)
        losses = run_clocks(pipe, 0, 1, ragged_batches(RUNTIME_CLOCKS + 2))
        runs.append((losses, pipe.model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name]), name


# --- 4. checkpoint/resume keeps the compensation's state -------------------------------------

def dropout_pipe(compensation, stash):
    return ddgpipe.DDG(dropout_mlp(), 3, sgd(lr=0.1), split=[1, 2], stash=stash,
                       compensation=compensation,
                       compensation_options={"pipemare_anneal": 6}
                       if "pipemare" in compensation else None)


@pytest.mark.parametrize("compensation,stash,state_key", [
    ("dc", "graph", "mean_square"), ("sc,lwp", "graph", None),
    ("pipemare", "none", "delta"), ("dc-c", "recompute", None),
    ("accumulate", "graph", "sums"), ("accumulate,dc,delay-lr", "recompute", "sums"),
    ("stage-momentum", "graph", None)])
def test_resume_mid_pipeline_is_bitwise(compensation, stash, state_key):
    data = batches(9, (6,), sizes=4, classes=3)
    uninterrupted = dropout_pipe(compensation, stash)
    for x, y in data:
        uninterrupted.step(x, y, F.cross_entropy)
    uninterrupted.drain()

    first = dropout_pipe(compensation, stash)
    for x, y in data[:5]:
        first.step(x, y, F.cross_entropy)
    saved = io.BytesIO()
    torch.save(first.checkpoint_state(), saved)

    def resume(drop_state: bool):
        pipe = dropout_pipe(compensation, stash)
        state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
        if drop_state:
            for stage in state["stages"]:
                stage["compensation"] = {}
        pipe.load_checkpoint_state(state)
        for x, y in data[5:]:
            pipe.step(x, y, F.cross_entropy)
        pipe.drain()
        return pipe.model.state_dict()

    resumed = resume(drop_state=False)
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed[name]), name
    if state_key is not None:  # the saved state is what made it bitwise
        saved_stage = first.checkpoint_state()["stages"][0]["compensation"]
        assert any(state_key in rule_state for rule_state in saved_stage.values())
        forgetful = resume(drop_state=True)
        assert any(not torch.equal(v, forgetful[n])
                   for n, v in uninterrupted.model.state_dict().items())


def test_resume_refuses_another_compensation(tmp_path, capsys):
    args = ["train", "--model", "mlp", "--data", "digits", "--epochs", "1", "--batch-size",
            "128", "--threads", "1", "--no-progress", "--method", "ddg", "--stages", "2",
            "--compensation", "sc,lwp", "--out", str(tmp_path / "run"), "--stop-after", "3"]
    assert main(args) == 0
    config = (tmp_path / "run" / "config.json").read_text()
    assert '"compensation": "sc,lwp"' in config
    capsys.readouterr()
    resume = args[:-4] + ["--compensation", "dc", "--resume", str(tmp_path / "run")]
    assert main(resume) == 2
    assert "--compensation: saved sc,lwp, given dc" in capsys.readouterr().err


# --- 5. errors that name the problem and the fix ---------------------------------------------

def adam(ps):
    return torch.optim.Adam(ps, lr=1e-3)


def build(compensation, optimizer=None, stash="graph", options=None, stages=2):
    return ddgpipe.DDG(resnet(), stages, optimizer or sgd(), stash=stash,
                       compensation=compensation, compensation_options=options)


@pytest.mark.parametrize("kwargs,message", [
    (dict(compensation="sc,spike"), "unknown compensation 'spike'; choose from sc, lwp"),
    (dict(compensation=["sc", "sc"]), "compensation sc given twice"),
    (dict(compensation="sc", optimizer=adam), "needs SGD with momentum, got Adam"),
    (dict(compensation="lwp", optimizer=adam), "needs SGD with momentum, got Adam"),
    (dict(compensation="sc", optimizer=sgd(momentum=0.0)), "needs SGD with momentum > 0"),
    (dict(compensation="sc", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9,
                                                                  nesterov=True)),
     "drop --nesterov"),
    (dict(compensation="dc", stash="none"), "use --stash graph or recompute with dc"),
    (dict(compensation="dc-c", stash="none"), "no delay to compensate"),
    (dict(compensation="pipemare", stash="graph", options={"pipemare_anneal": 5}),
     "use pipemare-lr (T1 alone) with stash graph"),
    (dict(compensation="pipemare-lr"), "pipemare needs pipemare_anneal=K"),
    (dict(compensation="dc,dc-c"), "dc and dc-c both change the gradient phase"),
    (dict(compensation="pipemare,pipemare-lr", stash="none", options={"pipemare_anneal": 5}),
     "both change the lr phase"),
    (dict(compensation="sc", options={"dc_lambda": 1.0}), "option dc_lambda only applies to"),
    (dict(compensation="dc", options={"lambda": 1.0}), "unknown compensation option lambda"),
    (dict(compensation="dc", options={"dc_lambda": -1.0}), "dc_lambda must be a positive"),
])
def test_clear_errors(kwargs, message):
    with pytest.raises(ddgpipe.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(**kwargs)


def adam_run(compensation, stash, options):
    """Three minibatches through K = 3 with Adam: the losses, every stage's step count, and
    its weights before and after."""
    pipe = build(compensation, adam, stash, options, stages=3)
    before = [[p.detach().clone() for p in s.module.parameters()] for s in pipe.stages]
    losses = [pipe.step(x, y, F.cross_entropy) for x, y in batches(3, sizes=16)]
    pipe.drain()
    after = [[p.detach().clone() for p in s.module.parameters()] for s in pipe.stages]
    return losses, [s.steps for s in pipe.stages], before, after


def test_rules_that_apply_to_adam_run_with_adam():
    for compensation, stash, options in [("dc", "graph", None), ("dc-c", "recompute", None),
                                         ("pipemare", "none", {"pipemare_anneal": 2})]:
        losses, steps, before, after = adam_run(compensation, stash, options)
        assert all(torch.isfinite(loss).all() for loss in losses), compensation
        assert steps == [3, 3, 3], compensation  # every stage learned from every minibatch
        for k, (start, end) in enumerate(zip(before, after)):
            assert all(torch.isfinite(p).all() for p in end), (compensation, k)
            assert any(not torch.equal(a, b) for a, b in zip(start, end)), (compensation, k)
        plain = adam_run(None, stash, None)[3]
        assert any(not torch.equal(a, b) for stage, other in zip(after, plain)
                   for a, b in zip(stage, other)), f"{compensation} changed nothing under Adam"


@pytest.mark.parametrize("method", ["bp", "dni"])
def test_cli_refuses_compensation_for_bp_and_dni(method, capsys):
    code = main(["train", "--method", method, "--compensation", "sc", "--no-progress",
                 "--out", "unused"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"--method {method} has none to correct" in err


@pytest.mark.parametrize("args,message", [
    (["--method", "fr", "--compensation", "dc"], "no delay to compensate"),
    (["--method", "ddg", "--optimizer", "adam", "--compensation", "sc,lwp"],
     "compensation sc needs SGD with momentum, got Adam"),
    (["--method", "ddg", "--dc-lambda", "1"], "option dc_lambda only applies to"),
])
def test_cli_refuses_bad_compensation_before_training(args, message, capsys):
    code = main(["train", *args, "--stages", "2", "--no-progress", "--out", "unused"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
