"""A parameter tied across stages: the float64 oracle (TiedOracle), K = 1 against backprop,
every executor against the reference bitwise, checkpoints holding the tie once, and the
refusals of what would give the copies different updates."""

import io
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddgpipe
from ddgpipe.core.schedule import DDGSchedule
from ddgpipe.core.ties import find_ties
from ddgpipe.errors import StageError, UsageError
from ddgpipe.methods.dni import DNI
from ddgpipe.runtime.launch import run_workers
from ddgpipe.runtime.ties import tie_groups
from ddgpipe.training.optim import decay_groups, make_optimizer
from tests.oracles import (
    ADAM_LR,
    ADAM_WD,
    BETAS,
    EPS,
    DDGOracle,
    MicrobatchedOracle,
    NpAdamW,
    NpSGD,
    TiedOracle,
    float64_default,
    lr_factor,
    numpy_params,
    tanh_net,
    tied_microbatched,
    torch_sgd,
)
from tests.runtime_helpers import assert_runtime_matches_reference, local_stage_arrays, run_clocks

WIDTH = 5
CLIP = 0.3


def tied_tanh(stages: int, seed: int = 3, tie: tuple[int, ...] | None = None) -> nn.Sequential:
    """K square tanh layers (one per stage), the matrices of layers ``tie`` (default: the
    first and the last) one Parameter."""
    model = tanh_net((WIDTH,) * (stages + 1), seed)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    tie = tie or (0, stages - 1)
    for k in tie[1:]:
        linears[k].weight = linears[tie[0]].weight
    return model


def tied_batches(n: int = 7, rows: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(rows, WIDTH)), rng.normal(size=(rows, WIDTH))) for _ in range(n)]


def torch_adamw(ps):
    return torch.optim.AdamW(decay_groups(ps, ADAM_WD), lr=ADAM_LR, betas=BETAS, eps=EPS)


OPTIMIZERS = {  # name -> (torch factory, numpy stage optimizer, numpy tie optimizer, lr)
    "sgd": (torch_sgd(), lambda k, d: NpSGD(), NpSGD, 0.1),
    "adamw": (torch_adamw, lambda k, d: NpAdamW(), NpAdamW, ADAM_LR),
}


def train_tied(stages, optimizer, clip=None, executor=None, tie=None, microbatches=1,
               batches=None):
    """ddgpipe's DDG on the tied tanh net: start weights, final weights, the model."""
    model = tied_tanh(stages, tie=tie)
    start = numpy_params(model)
    with float64_default():
        pipe = ddgpipe.DDG(model, stages, optimizer, clip_grad=clip, executor=executor,
                           lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_factor),
                           microbatches=microbatches)
        for x, y in batches or tied_batches():
            pipe.step(torch.from_numpy(x), torch.from_numpy(y), F.mse_loss)
        pipe.drain()
    return start, numpy_params(model), model


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("kind,clip", [("sgd", None), ("sgd", CLIP), ("adamw", None)])
def test_tied_layers_match_the_float64_oracle(stages, kind, clip):
    factory, np_opt, np_tie, lr = OPTIMIZERS[kind]
    start, final, model = train_tied(stages, factory, clip)
    oracle = TiedOracle([list(p) for p in start], tied_batches(), np_opt, tie=(0, stages - 1),
                        tie_optimizer=np_tie, lr=lr, schedule=lr_factor, clip=clip)
    expected = oracle.run()
    if clip is not None:
        assert oracle.clipped > 0, "the case must clip"
    for k, (w, b) in enumerate(final):
        np.testing.assert_allclose(w, expected[k][0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(b, expected[k][1], rtol=0, atol=1e-10)
    assert torch.equal(model[0][0].weight, model[-1].weight), "the copies stay bitwise equal"
    untied = DDGOracle([list(p) for p in start], tied_batches(), np_opt, lr=lr,
                       schedule=lr_factor, clip=clip).run()
    assert not np.allclose(untied[0][0], expected[0][0], atol=1e-6), "the tie must matter"


@pytest.mark.parametrize("stages,microbatches", [(2, 2), (2, 3), (3, 2), (3, 3)])
@pytest.mark.parametrize("kind,clip", [("sgd", CLIP), ("adamw", None)])
def test_tied_layers_under_microbatches_match_the_float64_oracle(stages, microbatches, kind,
                                                                 clip):
    """At each clock where uses step, the copies step with the sum of the stepping uses'
    means at the step's lr; in the drain (K = 3) the uses step at different clocks."""
    factory, np_opt, np_tie, lr = OPTIMIZERS[kind]
    batches = tied_batches(rows=6)
    start, final, model = train_tied(stages, factory, clip, microbatches=microbatches,
                                     batches=batches)
    settings = dict(lr=lr, schedule=lr_factor, clip=clip, microbatches=microbatches)
    expected = tied_microbatched([list(p) for p in start], batches, np_opt, tie=(0, stages - 1),
                                 tie_optimizer=np_tie, **settings).run()
    for k, (w, b) in enumerate(final):
        np.testing.assert_allclose(w, expected[k][0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(b, expected[k][1], rtol=0, atol=1e-10)
    assert torch.equal(model[0][0].weight, model[-1].weight), "the copies stay bitwise equal"
    untied = MicrobatchedOracle([list(p) for p in start], batches, np_opt, **settings).run()
    assert not np.allclose(untied[0][0], expected[0][0], atol=1e-6), "the tie must matter"
    per_clock = TiedOracle([list(p) for p in start], batches, np_opt, tie=(0, stages - 1),
                           tie_optimizer=np_tie, lr=lr, schedule=lr_factor, clip=clip).run()
    assert not np.allclose(per_clock[0][0], expected[0][0], atol=1e-6), "microbatches matter"


@pytest.mark.parametrize("stages,tie", [(3, (1, 2)), (4, (1, 2)), (3, (0, 1, 2))])
def test_a_tie_of_middle_stages_or_of_three_follows_the_same_rule(stages, tie):
    start, final, model = train_tied(stages, torch_sgd(), tie=tie)
    expected = TiedOracle([list(p) for p in start], tied_batches(), lambda k, d: NpSGD(),
                          tie=tie, tie_optimizer=NpSGD, schedule=lr_factor).run()
    for k, (w, b) in enumerate(final):
        np.testing.assert_allclose(w, expected[k][0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(b, expected[k][1], rtol=0, atol=1e-10)
    assert all(np.array_equal(final[tie[0]][0], final[k][0]) for k in tie)


def test_the_copy_steps_at_clocks_where_only_the_other_use_learns():
    """K = 3: stage 0 learns first at clock 2, but its copy moves from clock 0 (stage 2's
    gradient); in the drain stage 2's copy moves with stage 0's gradients."""
    model = tied_tanh(3)
    start = model[0][0].weight.detach().clone()
    bias = model[0][0].bias.detach().clone()
    pipe = ddgpipe.DDG(model, 3, torch_sgd(), executor="reference")
    x, y = (torch.from_numpy(a) for a in tied_batches(1)[0])
    pipe.step(x, y, F.mse_loss)
    assert not torch.equal(model[0][0].weight, start)
    assert torch.equal(model[0][0].bias, bias), "the rest of stage 0 waits for its gradient"
    assert torch.equal(model[0][0].weight, model[-1].weight)
    pipe.drain()
    assert [s.steps for s in pipe.stages] == [1, 1, 1]


def test_k1_on_a_tied_model_is_backprop_bitwise():
    batches = tied_batches()
    models = [tied_tanh(2), tied_tanh(2)]
    ddg = ddgpipe.DDG(models[0], 1, torch_sgd())
    bp = ddgpipe.Backprop(models[1], torch_sgd())
    for x, y in batches:
        a = ddg.step(torch.from_numpy(x), torch.from_numpy(y), F.mse_loss)
        b = bp.step(torch.from_numpy(x), torch.from_numpy(y), F.mse_loss)
        assert torch.equal(a, b)
    ddg.drain()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


# --- an embedding tied to the output projection, on every executor ----------------------------

VOCAB = 16


def tied_lm(stages: int) -> nn.Sequential:
    """Embedding, tanh layers, and an output projection sharing the embedding's matrix."""
    torch.manual_seed(0)
    embed, head = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB, bias=False)
    head.weight = embed.weight
    middle = [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(stages - 1)]
    return nn.Sequential(embed, *middle, head)


def token_batches(n: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randint(0, VOCAB, (6,), generator=g),
             torch.randint(0, VOCAB, (6,), generator=g)) for _ in range(n)]


def build_lm(stages, executor, **kw):
    return ddgpipe.DDG(tied_lm(stages), stages, torch_adamw, executor=executor,
                       peer_timeout_s=30, **kw)


def trained(pipe, batches):
    for x, y in batches:
        pipe.step(x, y, F.cross_entropy)
    pipe.drain()
    return {n: p.detach().clone() for n, p in pipe.model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("stages,microbatches", [(2, 1), (3, 1), (3, 2)])
def test_threads_equal_the_reference_bitwise(stages, microbatches, one_thread):
    ref = trained(build_lm(stages, "reference", microbatches=microbatches), token_batches())
    threads = trained(build_lm(stages, "threads", threads=1, microbatches=microbatches),
                      token_batches())
    assert ref.keys() == threads.keys()
    for name in ref:
        assert torch.equal(ref[name], threads[name]), name
    last = f"{stages}.weight"
    assert torch.equal(ref["0.weight"], ref[last]), "the copies stay bitwise equal"


def lm_worker(rank, world, microbatches=1):
    pipe = build_lm(world, None, microbatches=microbatches)
    losses = run_clocks(pipe, rank, world, token_batches())
    return {"state": local_stage_arrays(pipe), "losses": losses}


@pytest.mark.parametrize("stages,microbatches", [
    pytest.param(2, 1, marks=pytest.mark.slow), pytest.param(3, 1, marks=pytest.mark.slow),
    (3, 3)])
def test_processes_equal_the_reference_bitwise(stages, microbatches):
    results = run_workers(lm_worker, stages, (microbatches,), timeout_s=120, threads=1)
    assert_runtime_matches_reference(
        results, lambda: build_lm(stages, "reference", microbatches=microbatches),
        token_batches())
    first, last = results[0]["state"]["0.weight"], results[-1]["state"][f"{stages}.weight"]
    assert np.array_equal(first, last), "the ranks' copies stay bitwise equal"


def saving_worker(rank, world, batches):
    """Train the first clocks and return this rank's checkpoint, as bytes."""
    pipe = build_lm(world, None)
    first, last = rank == 0, rank == world - 1
    for x, y in batches:
        pipe.step(x if first else None, y if last else None, F.cross_entropy if last else None)
    buffer = io.BytesIO()
    torch.save(pipe.checkpoint_state(), buffer)
    return buffer.getvalue()


def resuming_worker(rank, world, saved, batches):
    pipe = build_lm(world, None)
    pipe.load_checkpoint_state(torch.load(io.BytesIO(saved[rank]), weights_only=False))
    run_clocks(pipe, rank, world, batches)
    return local_stage_arrays(pipe)


@pytest.mark.slow
def test_processes_resume_a_tie_held_once_bitwise(one_thread):
    """The last rank's checkpoint holds no copy of the tie: it gets the owner's at resume."""
    batches = token_batches(8)
    saved = run_workers(saving_worker, 3, (batches[:4],), timeout_s=120, threads=1)
    shared = [torch.load(io.BytesIO(b), weights_only=False)["shared"] for b in saved]
    assert "0.weight" in shared[0]["module"] and "3.weight" not in shared[-1]["module"]
    assert list(shared[0]["ties"]) == [0] and shared[-1]["ties"] == {}
    states = run_workers(resuming_worker, 3, (saved, batches[4:]), timeout_s=120, threads=1)
    reference = build_lm(3, "reference")
    run_clocks(reference, 0, 1, batches)
    for stage, state in zip(reference.stages, states, strict=True):
        for name, value in stage.module.state_dict().items():
            assert torch.equal(value, torch.from_numpy(state[name])), name


def test_a_failing_stage_stops_the_copy_waiting_for_its_gradients():
    """Stage 0 waits for the last stage's offer at the end of each clock; the last stage
    fails instead: the wait ends with the executor's stop, not its timeout."""
    calls = []

    def failing_loss(out, y):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    pipe = build_lm(3, "threads", threads=1)  # a peer timeout of 30 s
    start = time.monotonic()
    with pytest.raises(StageError, match="stage 2: RuntimeError: boom"):
        for x, y in token_batches():
            pipe.step(x, y, failing_loss)
        pipe.drain()
    assert not pipe.executor.workers.running
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("executor,microbatches", [("reference", 1), ("threads", 1),
                                                   ("threads", 2)])
def test_a_checkpoint_holds_the_tie_once_and_resumes_bitwise(executor, microbatches,
                                                              one_thread):
    batches = token_batches(8)
    whole = trained(build_lm(3, executor, microbatches=microbatches), batches)
    pipe = build_lm(3, executor, microbatches=microbatches)
    for x, y in batches[:4]:
        pipe.step(x, y, F.cross_entropy)
    buffer = io.BytesIO()
    torch.save(pipe.checkpoint_state(), buffer)
    pipe.close()
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    first, last = state["stages"][0], state["stages"][-1]
    assert "0.weight" in first["module"] and "3.weight" not in last["module"]
    assert list(first["ties"]) == [0] and last["ties"] == {}
    resumed = build_lm(3, executor, microbatches=microbatches)
    resumed.load_checkpoint_state(state)
    for x, y in batches[4:]:
        resumed.step(x, y, F.cross_entropy)
    resumed.drain()
    got = {n: p for n, p in resumed.model.named_parameters(remove_duplicate=False)}
    for name in whole:
        assert torch.equal(whole[name], got[name]), name


def test_a_factory_that_tells_parameters_apart_by_identity_builds_every_copy_alike():
    """Muon leaves the embedding (by its id) to AdamW: the last stage's copy, a new
    Parameter, must get AdamW too, or the copies drift apart."""
    model = tied_lm(2)
    muon = make_optimizer("muon", 0.02, weight_decay=0.1,
                          adamw_only=frozenset({id(model[0].weight)}))
    pipe = ddgpipe.DDG(model, 2, muon, executor="reference")
    trained(pipe, token_batches())
    assert pipe.stages[1].ties.optimizers[0].muon is None
    assert torch.equal(model[0].weight, model[2].weight)


def test_a_state_dict_holds_the_tie_once_and_loads_into_every_copy():
    pipe = build_lm(3, "reference")
    trained(pipe, token_batches(3))
    state = pipe.state_dict()
    assert "3.weight" not in state["stages"][-1]["module"]
    fresh = build_lm(3, "reference")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.model[3].weight, pipe.model[0].weight)
    assert torch.equal(fresh.model[0].weight, pipe.model[0].weight)
    moments = [s.ties.optimizers[0].state_dict()["state"][0]["exp_avg"]
               for s in (fresh.stages[0], fresh.stages[-1])]
    assert torch.equal(*moments) and moments[0].data_ptr() != moments[1].data_ptr()


# --- the refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("settings,named", [
    ({"compensation": "delay-lr"}, "compensation delay-lr"),
    ({"grad_shrink": 0.9}, "grad_shrink"),
    ({"precision": "fp16"}, "fp16"),
])
def test_what_would_make_the_copies_differ_is_refused(settings, named):
    with pytest.raises(UsageError, match=f"tied parameter stage 0 '0.weight' = stage 1 "
                                         f"'2.weight'.*which {named}.*untie"):
        build_lm(2, "reference", **settings)


def test_dni_has_no_tie_rule():
    with pytest.raises(UsageError, match="dni has no rule for a parameter used by two stages"):
        DNI(tied_lm(2), 2, torch_adamw, executor="reference")


def test_replicas_refuse_a_tie():
    model = tied_lm(2)
    with pytest.raises(UsageError, match="replicas do not exchange tied gradients"):
        tie_groups([model[:1], model[1:]], DDGSchedule(2), replicas=2)


def test_one_module_in_two_stages_is_refused():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Linear(4, 4), shared)
    with pytest.raises(UsageError, match="one module object is used by stages 0, 1"):
        ddgpipe.DDG(model, 2, torch_sgd(), split=[2], executor="reference")


def test_find_ties_names_each_use_and_skips_frozen_shares():
    model = tied_lm(3)
    slices = [model[:1], model[1:3], model[3:]]
    (tie,) = find_ties(slices)
    assert tie.uses == ((0, ("0.weight",)), (2, ("3.weight",)))
    model[0].weight.requires_grad_(False)
    assert find_ties(slices) == []
