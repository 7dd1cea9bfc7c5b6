"""The threaded executor (a thread per stage) against the reference executor: bitwise, and
failures that name the stage, never hang and leave no thread behind."""

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddgpipe
from ddgpipe.errors import StageError
from ddgpipe.methods.dni import DNI
from tests.helpers import (
    assert_same,
    batches,
    conv_block,
    dropout_convnet,
    pool_head,
    ragged_batches,
    sgd,
    step_lr,
    train,
)

SEED = 1234  # the caller's RNG, which the stages' streams start from


def deterministic_model():
    """No random layer: its stages run without the random-stream lock."""
    torch.manual_seed(0)
    return nn.Sequential(conv_block(1, 8, batchnorm=True), conv_block(8, 8, stride=2),
                         pool_head(8))


optimizer, scheduler = sgd(), step_lr()


def build(executor, method="ddg", stages=2, stash="graph", model=dropout_convnet, **kwargs):
    if method == "dni":
        return DNI(model(), stages, optimizer, lr_scheduler=scheduler, executor=executor,
                   threads=1, peer_timeout_s=30)
    kwargs.setdefault("peer_timeout_s", 30)
    return ddgpipe.DDG(model(), stages, optimizer, lr_scheduler=scheduler, stash=stash,
                       executor=executor, threads=1, **kwargs)


def stage_threads():
    return [t for t in threading.enumerate() if t.name.startswith("ddgpipe-stage")]


def no_stage_thread_within(seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while stage_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not stage_threads()


@pytest.fixture(autouse=True)
def one_thread():
    assert no_stage_thread_within(2.0), "stage threads of an earlier test are still running"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference computes on this thread, one intra-op thread
    yield
    torch.set_num_threads(threads)
    # drained, closed or dropped pipelines stop their threads (a poll is 50 ms)
    assert no_stage_thread_within(1.0), "a stage thread outlived its test"


@pytest.mark.slow
def test_a_dropped_pipeline_stops_its_threads():
    pipe = build("threads", stages=3, model=deterministic_model)
    pipe.step(*ragged_batches(1)[0], F.cross_entropy)
    assert len(stage_threads()) == 3
    del pipe  # no drain, no close
    assert no_stage_thread_within(1.0)


@pytest.mark.parametrize("method,stages,stash,model", [
    ("ddg", 2, "graph", dropout_convnet), ("ddg", 2, "recompute", dropout_convnet),
    ("ddg", 3, "graph", dropout_convnet), ("ddg", 3, "recompute", dropout_convnet),
    ("ddg", 3, "none", dropout_convnet), ("ddg", 3, "graph", deterministic_model),
    ("dni", 2, None, dropout_convnet), ("dni", 3, None, dropout_convnet),
])
def test_threads_match_the_reference_bitwise(method, stages, stash, model):
    data = ragged_batches(9)
    reference = train(build("reference", method, stages, stash, model), data, SEED)
    threaded = train(build("threads", method, stages, stash, model), data, SEED)
    assert_same(threaded, reference)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("stash", ["graph", "recompute"])
def test_threads_match_the_reference_with_microbatches(stages, stash):
    """Microbatched DDG (M = 2): a dropout network's losses, weights and buffers agree."""
    data = batches(7, sizes=(8, 6, 4))
    reference = train(build("reference", "ddg", stages, stash, microbatches=2), data, SEED)
    threaded = train(build("threads", "ddg", stages, stash, microbatches=2), data, SEED)
    assert_same(threaded, reference)
    fed_by_run = train(build("threads", "ddg", stages, stash, microbatches=2), data, SEED,
                       use_run=True)
    assert_same(fed_by_run, reference)


@pytest.mark.parametrize("stash,free_backward", [("graph", True), ("recompute", False),
                                                  ("none", False)])
def test_only_the_forwards_of_a_dropout_network_hold_the_generator_lock(stash, free_backward):
    """Backwards and steps that draw nothing (and replay no forward) run beside the other
    stages' work; a replay restores its forward's random state, so it keeps the lock."""
    with build("threads", stages=3, stash=stash) as pipe:
        train(pipe, ragged_batches(6), SEED)
        free = pipe.executor.workers.free_ops
    assert all("F" not in ops and "S" in ops for ops in free)
    assert "B" in free[-1]  # the last stage never replays
    assert all(("B" in ops) == free_backward for ops in free[:-1])


@pytest.mark.parametrize("compensation, microbatches", [("sc,lwp", 1), ("dc", 1),
                                                        ("sc,lwp", 2)])
def test_threads_match_the_reference_with_a_compensation(compensation, microbatches):
    data = batches(7, sizes=(8, 6, 4)) if microbatches > 1 else ragged_batches(7)
    reference = train(build("reference", stages=3, compensation=compensation,
                            microbatches=microbatches), data, SEED)
    threaded = train(build("threads", stages=3, compensation=compensation,
                           microbatches=microbatches), data, SEED)
    assert_same(threaded, reference)


def test_run_feeds_ahead_and_gives_the_losses_of_step():
    data = ragged_batches(9)
    stepped = train(build("threads", stages=3), data, SEED)
    assert_same(train(build("threads", stages=3), data, SEED, use_run=True), stepped)


def test_leaving_run_early_keeps_the_pipeline_consistent():
    data = ragged_batches(8)
    pipe = build("threads", stages=3)
    losses = pipe.run(data[:6], F.cross_entropy)
    first = [next(losses).item() for _ in range(2)]  # K = 3 fed ahead of each loss taken
    losses.close()  # their losses are collected, not left in the queue
    assert pipe.fed == 5
    later = pipe.step(*data[5], F.cross_entropy)  # the loss of minibatch 5, not of 2
    pipe.drain()
    ref = build("reference", stages=3)
    ref_losses = [ref.step(x, y, F.cross_entropy).item() for x, y in data[:6]]
    assert first == ref_losses[:2] and later.item() == ref_losses[5]


def test_evaluation_and_state_wait_for_the_stages():
    """Reading the weights mid-training (no drain) sees every fed clock finished."""
    data = ragged_batches(5)
    threaded, reference = build("threads", stages=3), build("reference", stages=3)
    for pipe in (threaded, reference):
        torch.manual_seed(1234)
        for x, y in data:
            pipe.step(x, y, F.cross_entropy)
        pipe.eval()  # waits for the stages: seeding for the next run must not race them
    x = data[0][0]
    assert torch.equal(threaded.predict(x), reference.predict(x))
    assert threaded.lr == reference.lr
    for a, b in zip(threaded.state_dict()["stages"], reference.state_dict()["stages"]):
        for name in a["module"]:
            assert torch.equal(a["module"][name], b["module"][name])
    threaded.close()


class Exploding(nn.Module):
    def __init__(self, at_call: int):
        super().__init__()
        self.calls, self.at_call = 0, at_call

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at_call:
            raise RuntimeError("injected failure")
        return x


@pytest.mark.slow
def test_a_failing_stage_stops_every_thread_with_its_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Sequential(Exploding(3)),
                          nn.Linear(4, 2))
    pipe = ddgpipe.DDG(model, 4, optimizer, executor="threads", split=[1, 2, 3],
                       peer_timeout_s=30)
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    start = time.monotonic()
    with pytest.raises(StageError) as info:
        for _ in range(10):
            pipe.step(x, y, F.cross_entropy)
    assert info.value.stage == 2 and "injected failure" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert time.monotonic() - start < 10
    assert stage_threads() == []
    with pytest.raises(StageError):  # the pipeline stays failed
        pipe.step(x, y, F.cross_entropy)


class Sleeper(nn.Module):
    def __init__(self, seconds: float, at_call: int):
        super().__init__()
        self.seconds, self.calls, self.at_call = seconds, 0, at_call

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at_call:
            time.sleep(self.seconds)
        return x


@pytest.mark.slow
def test_a_hung_stage_times_out_instead_of_hanging():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(Sleeper(4.0, 2)), nn.Linear(4, 2))
    pipe = ddgpipe.DDG(model, 3, optimizer, executor="threads", split=[1, 2],
                       peer_timeout_s=1.0)
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    start = time.monotonic()
    with pytest.raises(StageError, match="did not come|waited"):
        for _ in range(5):
            pipe.step(x, y, F.cross_entropy)
    assert time.monotonic() - start < 3.5  # the timeout, not the 4 s sleep, ended it
    # A thread cannot be interrupted inside an op; once the sleep returns it sees the stop
    # and ends instead of living on.
    assert no_stage_thread_within(10.0)


@pytest.mark.slow
def test_waiting_for_the_caller_is_not_a_timeout():
    """Between two steps the stages wait for the next minibatch as long as the caller takes."""
    pipe = build("threads", stages=3, model=deterministic_model, peer_timeout_s=0.3)
    data = ragged_batches(3)
    first = pipe.step(*data[0], F.cross_entropy)
    time.sleep(0.8)  # an evaluation, a checkpoint... longer than the peer timeout
    second = pipe.step(*data[1], F.cross_entropy)
    pipe.drain()
    assert torch.isfinite(first) and torch.isfinite(second)
    assert [stage.steps for stage in pipe.stages] == [2, 2, 2]  # both learned from everywhere


def test_a_non_finite_loss_stops_the_threads():
    pipe = build("threads", stages=2)
    data = ragged_batches(4)
    with pytest.raises(ddgpipe.NonFiniteLossError, match="minibatch 2"):
        for i, (x, y) in enumerate(data):
            pipe.step(x * float("nan") if i == 2 else x, y, F.cross_entropy)
    assert stage_threads() == []


def test_threads_is_the_default_for_several_stages():
    pipe = ddgpipe.DDG(deterministic_model(), 2, optimizer)
    assert pipe.executor_kind == "threads"
    assert ddgpipe.DDG(deterministic_model(), 1, optimizer).executor_kind == "reference"
    with pytest.raises(ddgpipe.UsageError, match="start the ranks"):
        ddgpipe.DDG(deterministic_model(), 2, optimizer, executor="processes")
    with pytest.raises(ddgpipe.UsageError, match="unknown executor"):
        ddgpipe.DDG(deterministic_model(), 2, optimizer, executor="fibers")


def test_drawing_from_the_global_generator_while_stages_run_is_warned_about_once():
    """Stages with dropout swap their streams into torch's one generator; a caller drawing
    from it between feeds races with them, which the executor sees and says, once."""
    data = ragged_batches(6)
    with build("threads", stages=2) as pipe:
        with pytest.warns(RuntimeWarning, match="drew from torch's global random generator") \
                as caught:
            for x, y in data:
                pipe.step(x, y, F.cross_entropy)
                # e.g. a data pipeline without a generator of its own; the lock only places
                # the draw between two swaps (one inside a swap takes from a stage's stream)
                with pipe.executor.rng.lock:
                    torch.rand(3)
        assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1


def test_a_caller_with_its_own_generator_is_not_warned(recwarn):
    g = torch.Generator().manual_seed(0)
    with build("threads", stages=2) as pipe:
        for x, y in ragged_batches(6):
            pipe.step(x, y, F.cross_entropy)
            torch.rand(3, generator=g)
    assert not [w for w in recwarn if "global random generator" in str(w.message)]
