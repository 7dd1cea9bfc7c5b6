"""One clock of one stage: which links it uses, in which order, around which computations.

A recording stage and recording links write into one log, so the order of every receive,
send, computation, guard and callback is visible; the schedule's own actions drive it. One
test drives real stages through the whole schedule with in-memory links and compares them
with the reference executor, bitwise.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddgpipe
from ddgpipe.core.clock import run_stage_clock
from ddgpipe.core.schedule import Action, ddg_actions, ddg_schedule, dni_actions
from ddgpipe.core.stage import Stage
from ddgpipe.core.timeline import Timeline

COMPUTE = {"forward", "forward_loss", "backward", "step", "learn"}
LINKS = {"recv_activation", "send_activation", "recv_gradient", "send_gradient", "target"}


class RecordingStage:
    """Stands in for :class:`Stage`: logs each call and returns tagged values."""

    def __init__(self, index: int, num_stages: int, log: list, gradient_op: str = "B"):
        self.index, self.num_stages, self.log = index, num_stages, log
        self.gradient_op = gradient_op
        self.grad_loss_scale = 0.5  # what the backward says its input gradient carries
        self.offered = 0  # clocks whose tied gradients were offered

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def forward(self, m, x, overflow):
        self.log.append(("forward", m, x, overflow))
        return f"out{m}"

    def forward_loss(self, m, x, y, loss_fn, overflow):
        self.log.append(("forward_loss", m, x, y, loss_fn, overflow))
        return torch.tensor(float(m))

    def take_overflow(self):
        return "report"

    def backward(self, m, grad, scale):
        self.log.append(("backward", m, grad, scale))
        return None if self.is_first else (f"gin{m}",)

    def step(self, m):
        self.log.append(("step", m))

    def learn(self, m, grad):
        self.log.append(("learn", m, grad))

    def offer_ties(self):
        self.offered += 1  # counted apart from the log

    def end_clock(self, ends_step=True):
        self.log.append(("end_clock",))


class RecordingLinks:
    def __init__(self, log: list):
        self.log = log

    def recv_activation(self, stage, m):
        self.log.append(("recv_activation", m))
        return f"x{m}", f"overflow{m}"

    def send_activation(self, stage, m, out, overflow):
        self.log.append(("send_activation", m, out, overflow))

    def recv_gradient(self, stage, m):
        self.log.append(("recv_gradient", m))
        return (f"g{m}",), 4.0

    def send_gradient(self, stage, m, grads, loss_scale):
        self.log.append(("send_gradient", m, grads, loss_scale))

    def target(self, stage, m):
        self.log.append(("target", m))
        return f"y{m}", "loss_fn"


def run(index, num_stages, actions, gradient_op="B", record_loss=False, **kwargs):
    """One clock of a recording stage with a logging guard (and on_loss, with
    ``record_loss``); returns its result and the log."""
    log: list = []
    if record_loss:
        kwargs["on_loss"] = lambda m, loss: log.append(("on_loss", m, loss))

    @contextmanager
    def guard(stage, op):
        assert stage.index == index and op in "FBSG"
        log.append(("enter",))
        yield
        log.append(("exit",))

    stage = RecordingStage(index, num_stages, log, gradient_op)
    result = run_stage_clock(stage, actions, RecordingLinks(log), guard=guard, **kwargs)
    return result, log


def test_the_tied_gradients_are_offered_after_the_actions_and_the_clock_may_end_later():
    """The reference executor ends the clocks itself once every stage has offered."""
    log: list = []
    stage = RecordingStage(0, 3, log)
    run_stage_clock(stage, ddg_actions(0, 3, 2), RecordingLinks(log), end_clock=False)
    assert stage.offered == 1 and ("end_clock",) not in log


def test_the_first_stage_in_steady_state():
    """Stage 0 of 3 at clock 2: F2 (the data in, the activation out), then B0 with the
    gradient stage 1 sent, S0; nothing goes back from the first stage."""
    result, log = run(0, 3, ddg_actions(0, 3, 2))
    assert result is None
    assert log == [
        ("recv_activation", 2), ("enter",), ("forward", 2, "x2", "overflow2"), ("exit",),
        ("send_activation", 2, "out2", "report"),
        ("recv_gradient", 0), ("enter",), ("backward", 0, ("g0",), 4.0), ("exit",),
        ("enter",), ("step", 0), ("exit",),
        ("end_clock",),
    ]


def test_a_middle_stage_sends_the_input_gradient_back_with_its_scale():
    _, log = run(1, 3, ddg_actions(1, 3, 2))
    assert log == [
        ("recv_activation", 2), ("enter",), ("forward", 2, "x2", "overflow2"), ("exit",),
        ("send_activation", 2, "out2", "report"),
        ("recv_gradient", 1), ("enter",), ("backward", 1, ("g1",), 4.0), ("exit",),
        ("send_gradient", 1, ("gin1",), 0.5),
        ("enter",), ("step", 1), ("exit",),
        ("end_clock",),
    ]


def test_the_last_stage_reports_its_loss_before_its_backward():
    """No gradient to receive (its output is the loss); on_loss gets the loss right after
    the forward's guard closes, before B; the clock returns that same loss."""
    result, log = run(2, 3, ddg_actions(2, 3, 0), record_loss=True)
    assert result.item() == 0.0
    assert log == [
        ("recv_activation", 0), ("target", 0),
        ("enter",), ("forward_loss", 0, "x0", "y0", "loss_fn", "overflow0"), ("exit",),
        ("on_loss", 0, result),
        ("enter",), ("backward", 0, None, 1.0), ("exit",),
        ("send_gradient", 0, ("gin0",), 0.5),
        ("enter",), ("step", 0), ("exit",),
        ("end_clock",),
    ]
    assert log[5][2] is result


def test_warm_up_and_drain_clocks_run_only_their_actions():
    """Stage 0 of 3 forwards alone while the pipeline fills, and only backpropagates and
    steps while it drains (3 minibatches: clock 4 is B2 S2)."""
    result, log = run(0, 3, ddg_actions(0, 3, 0))
    assert result is None
    assert log == [("recv_activation", 0), ("enter",), ("forward", 0, "x0", "overflow0"),
                   ("exit",), ("send_activation", 0, "out0", "report"), ("end_clock",)]
    _, log = run(0, 3, ddg_actions(0, 3, 4, minibatches=3))
    assert log == [("recv_gradient", 2), ("enter",), ("backward", 2, ("g2",), 4.0), ("exit",),
                   ("enter",), ("step", 2), ("exit",), ("end_clock",)]


def test_one_stage_is_first_and_last():
    result, log = run(0, 1, ddg_actions(0, 1, 5))
    assert result.item() == 5.0
    assert [e[0] for e in log] == ["recv_activation", "target", "enter", "forward_loss", "exit",
                                   "enter", "backward", "exit", "enter", "step", "exit",
                                   "end_clock"]


def test_a_stage_whose_gradient_goes_to_g_receives_it_there():
    """DNI: B runs on a synthetic gradient (nothing received), G learns from the true one."""
    _, log = run(0, 2, dni_actions(0, 2, 1), gradient_op="G")
    assert log == [
        ("recv_activation", 1), ("enter",), ("forward", 1, "x1", "overflow1"), ("exit",),
        ("send_activation", 1, "out1", "report"),
        ("enter",), ("backward", 1, None, 1.0), ("exit",),
        ("enter",), ("step", 1), ("exit",),
        ("recv_gradient", 0), ("enter",), ("learn", 0, ("g0",)), ("exit",),
        ("end_clock",),
    ]


def test_an_unknown_op_is_refused_before_the_clock_ends():
    with pytest.raises(RuntimeError, match="no executor for op 'X'"):
        run(0, 2, [Action(0, "X", 0)])  # type: ignore[arg-type]


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_the_guard_brackets_every_computation_and_no_link(stages):
    """Over a whole schedule (warm-up, steady state, drain): each computation inside exactly
    one guard, each link call and the end of the clock outside every guard."""
    for clock in ddg_schedule(stages, 4):
        for k, actions in enumerate(clock):
            _, log = run(k, stages, actions)
            inside, computed = False, []
            for event in log:
                name = event[0]
                if name == "enter":
                    assert not inside
                    inside = True
                elif name == "exit":
                    assert inside and computed and computed[-1] == "open"
                    computed[-1] = "closed"
                    inside = False
                elif name in COMPUTE:
                    assert inside, event
                    computed.append("open")
                else:
                    assert name in LINKS | {"end_clock"} and not inside, event
            assert log[-1] == ("end_clock",)
            assert len(computed) == len(actions)


def test_the_timeline_records_every_action_in_order():
    timeline = Timeline(max_minibatches=None)
    actions = ddg_actions(1, 3, 2)
    run(1, 3, actions, timeline=timeline)
    assert [(r["stage"], r["op"], r["minibatch"]) for r in timeline.records] == [
        (1, "F", 2), (1, "B", 1), (1, "S", 1)]
    starts = [r["start"] for r in timeline.records]
    assert starts == sorted(starts)
    assert all(r["start"] <= r["end"] for r in timeline.records)
    ends = [r["end"] for r in timeline.records]
    assert all(end <= start for end, start in zip(ends, starts[1:]))


# --- real stages ---------------------------------------------------------------------------

class DictLinks:
    """The smallest real links: activations and gradients in dicts, as the reference does."""

    def __init__(self, batches):
        self.batches, self.acts, self.grads = batches, {}, {}

    def recv_activation(self, stage, m):
        if stage.is_first:
            return self.batches[m][0], False
        return self.acts.pop((stage.index, m))

    def send_activation(self, stage, m, out, overflow):
        self.acts[(stage.index + 1, m)] = (out, overflow)

    def recv_gradient(self, stage, m):
        return self.grads.pop((stage.index, m))

    def send_gradient(self, stage, m, grads, loss_scale):
        self.grads[(stage.index - 1, m)] = (grads, loss_scale)

    def target(self, stage, m):
        return self.batches[m][1], F.cross_entropy


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.Tanh()),
                         nn.Sequential(nn.Linear(6, 6), nn.Tanh()),
                         nn.Linear(6, 3)).double()


def optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def test_real_stages_over_dict_links_are_the_reference_executor_bitwise():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 4, dtype=torch.float64, generator=g),
                torch.randint(0, 3, (5,), generator=g)) for _ in range(4)]
    net = model()
    stages = [Stage(k, 3, net[k], optimizer) for k in range(3)]
    links, losses = DictLinks(batches), []
    for clock in ddg_schedule(3, len(batches)):
        for stage, actions in zip(stages, clock, strict=True):
            loss = run_stage_clock(stage, actions, links)
            if loss is not None:
                losses.append(loss.item())
    assert not links.acts and not links.grads, "every message was consumed"
    assert [s.steps for s in stages] == [4, 4, 4]
    pipe = ddgpipe.DDG(model(), 3, optimizer, split=[1, 2], executor="reference")
    expected = [pipe.step(x, y, F.cross_entropy).item() for x, y in batches]
    pipe.drain()
    assert losses == expected
    for ours, theirs in zip(net.state_dict().values(), pipe.model.state_dict().values(),
                            strict=True):
        assert torch.equal(ours, theirs)
    assert not torch.equal(net[0][0].weight, model()[0][0].weight), "the weights never moved"
