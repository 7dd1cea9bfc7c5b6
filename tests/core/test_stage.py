"""One stage on its own, driven by hand as an executor drives it (F, then B and S d_k clocks
later), against plain autograd on a copy of its module and the SGD rule written out."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddgpipe.core.stage import Stage
from ddgpipe.errors import UsageError
from tests import helpers

F64 = torch.float64
LR = 0.1


def block(seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 6), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(6, 3))
    return nn.Sequential(*layers).to(F64)


sgd = helpers.sgd(lr=LR, momentum=0.0, weight_decay=0.0)
momentum_sgd = helpers.sgd(lr=LR, momentum=0.9, weight_decay=0.01)


def halving(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def data(seed: int, rows: int = 5, cols: int = 4) -> Tensor:
    return torch.randn(rows, cols, dtype=F64, generator=torch.Generator().manual_seed(seed))


def weights_of(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def reference_grads(module: nn.Module, weights: dict[str, Tensor], x: Tensor, g: Tensor):
    """Gradients of <g, module(x)> at ``weights`` by plain autograd on a copy."""
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(weights[name])
    xin = x.detach().requires_grad_(True)
    twin(xin).backward(g)
    return {n: p.grad for n, p in twin.named_parameters()}, xin.grad


def test_the_delay_of_stage_k_is_k_minus_1_minus_k():
    stages = [Stage(k, 4, block(), sgd) for k in range(4)]
    assert [s.delay for s in stages] == [3, 2, 1, 0]
    assert [s.stash.mode for s in stages] == ["graph", "graph", "graph", "live"]
    assert [(s.is_first, s.is_last) for s in stages] == [
        (True, False), (False, False), (False, False), (False, True)]
    assert Stage(0, 2, block(), sgd, delay=0).stash.mode == "live"  # an explicit delay wins
    assert Stage(0, 1, block(), sgd).delay == 0  # K = 1 is backprop


def test_the_in_flight_minibatches_are_a_queue_of_delay_plus_one():
    stage = Stage(0, 3, block(), sgd)
    for m in range(3):
        stage.forward(m, data(m))
    assert [p.minibatch for p in stage.inflight] == [0, 1, 2]
    assert stage.backward(0, (data(10, cols=3),)) is None  # the first stage sends nothing back
    stage.step(0)
    assert [p.minibatch for p in stage.inflight] == [1, 2] and stage.steps == 1
    stage.forward(3, data(3))
    stage.backward(1, (data(11, cols=3),))
    stage.step(1)
    assert [p.minibatch for p in stage.inflight] == [2, 3] and stage.steps == 2


def test_a_backward_for_the_wrong_minibatch_is_refused():
    stage = Stage(0, 3, block(), sgd)
    stage.forward(0, data(0))
    stage.forward(1, data(1))
    with pytest.raises(RuntimeError, match="stage 0: backward of minibatch 1 but the oldest "
                                           "in-flight minibatch is 0"):
        stage.backward(1, (data(10, cols=3),))


def test_forward_hands_on_a_detached_output_marked_for_its_gradient():
    for stash in ("graph", "recompute", "none"):
        module = block()
        stage = Stage(1, 3, module, sgd, stash=stash)
        x = data(0).requires_grad_(True)
        sent = stage.forward(0, x)
        with torch.no_grad():
            assert torch.equal(sent, module(x)), stash
        assert sent.requires_grad and sent.grad_fn is None, stash
        pending = stage.inflight[0]
        assert pending.output_marks == [True] and pending.grad_shapes == [((5, 3), F64)], stash


def test_an_integer_output_travels_unmarked():
    class WithIds(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return self.linear(x), x.argmax(dim=1)

    torch.manual_seed(0)
    stage = Stage(0, 2, WithIds().to(F64), sgd)
    h, ids = stage.forward(0, data(0))
    assert h.requires_grad and not ids.requires_grad and ids.dtype == torch.int64
    assert stage.inflight[0].output_marks == [True, False]
    assert stage.inflight[0].grad_shapes == [((5, 3), F64)]


def test_the_last_stage_backward_and_step_are_backprop():
    module = block()
    stage = Stage(1, 2, module, sgd)
    x, y = data(0).requires_grad_(True), torch.tensor([0, 1, 2, 1, 0])
    before = weights_of(module)
    loss = stage.forward_loss(0, x, y, F.cross_entropy)
    assert loss.grad_fn is None
    twin = copy.deepcopy(module)
    xin = x.detach().requires_grad_(True)
    expected = F.cross_entropy(twin(xin), y)
    expected.backward()
    assert torch.equal(loss, expected.detach())
    (grad_in,) = stage.backward(0)
    assert torch.allclose(grad_in, xin.grad, rtol=0, atol=1e-15)
    stage.step(0)
    for name, p in module.named_parameters():
        want = before[name] - LR * dict(twin.named_parameters())[name].grad
        assert torch.allclose(p.detach(), want, rtol=0, atol=1e-15), name
    assert stage.steps == 1 and not stage.inflight


def test_a_delayed_step_applies_the_gradient_at_its_forward_weights():
    """Stage 0 of 2: F0 | F1 B0 S0 | B1 S1. Minibatch 1 ran its forward before S0, so its
    gradient is taken at w^0 although S1 applies it to w^1."""
    module = block()
    stage = Stage(0, 2, module, sgd)
    w0 = weights_of(module)
    x0, x1, g0, g1 = data(0), data(1), data(10, cols=3), data(11, cols=3)
    stage.forward(0, x0)
    stage.forward(1, x1)
    stage.backward(0, (g0,))
    stage.step(0)
    stage.backward(1, (g1,))
    stage.step(1)
    grads0, _ = reference_grads(module, w0, x0, g0)
    grads1, _ = reference_grads(module, w0, x1, g1)
    w1 = {n: w0[n] - LR * grads0[n] for n in w0}
    fresh1, _ = reference_grads(module, w1, x1, g1)
    for name, p in module.named_parameters():
        assert torch.allclose(p.detach(), w1[name] - LR * grads1[name], rtol=0, atol=1e-14)
    assert not torch.allclose(grads1["0.weight"], fresh1["0.weight"])  # w^0 vs w^1 matters


def test_a_non_scalar_loss_is_refused():
    stage = Stage(0, 1, block(), sgd)
    with pytest.raises(ValueError, match=r"scalar \(got shape \(5,\)\)"):
        stage.forward_loss(0, data(0), torch.zeros(5, dtype=torch.long),
                           lambda out, y: F.cross_entropy(out, y, reduction="none"))


def test_an_input_the_first_stage_cannot_take_names_its_shape():
    stage = Stage(0, 2, block(), sgd)
    with pytest.raises(UsageError, match=r"stage 0 cannot take an input of shape \(5, 6\) .*"
                                         r"check the data against the model's expected input"):
        stage.forward(0, data(0, cols=6))


def not_called(_):
    raise AssertionError("a stage without parameters builds no optimizer or schedule")


def test_a_stage_without_parameters_passes_gradients_on():
    stage = Stage(1, 3, nn.Tanh(), not_called, lr_scheduler=not_called)
    assert not stage.has_parameters and stage.optimizer is None and stage.params == {}
    assert math.isnan(stage.lr)
    x, g = data(0).requires_grad_(True), data(1)
    sent = stage.forward(0, x)
    assert torch.equal(sent, torch.tanh(x).detach()) and sent.requires_grad
    (grad_in,) = stage.backward(0, (g,))
    assert torch.allclose(grad_in, g * (1 - torch.tanh(x.detach()) ** 2), rtol=0, atol=1e-15)
    stage.step(0)
    stage.end_clock()
    assert stage.steps == 1
    assert stage.state_dict()["optimizer"] is None


def test_a_frozen_parameter_is_neither_stashed_nor_stepped():
    module = block()
    module[0].bias.requires_grad_(False)
    frozen = module[0].bias.detach().clone()
    stage = Stage(0, 2, module, sgd)
    assert "0.bias" not in stage.params and len(stage.params) == 3
    stage.forward(0, data(0))
    stage.backward(0, (data(1, cols=3),))
    stage.step(0)
    assert torch.equal(module[0].bias, frozen)
    assert not torch.equal(module[0].weight.detach(), block()[0].weight.detach())


def shrunk_run(beta: float, index: int, num_stages: int):
    """Forward minibatch 0 and every one up to the backward of 0, then B0 and S0."""
    module = block()
    stage = Stage(index, num_stages, module, sgd, grad_shrink=beta)
    for m in range(stage.delay + 1):
        stage.forward(m, data(m).requires_grad_(True))
    grad_in = stage.backward(0, (data(10, cols=3),))
    raw = {n: p.grad.clone() for n, p in module.named_parameters()}
    before = weights_of(module)
    stage.step(0)
    return stage, grad_in, raw, before


def test_grad_shrink_scales_the_delayed_gradient_by_beta_to_the_delay():
    stage, grad_in, raw, before = shrunk_run(0.5, 0, 3)
    _, plain_in, plain_raw, _ = shrunk_run(1.0, 0, 3)
    assert stage.grad_scale == 0.25
    for name, p in stage.module.named_parameters():
        assert torch.equal(raw[name], plain_raw[name]), "the backward itself is unchanged"
        assert torch.equal(p.grad, 0.25 * raw[name]), name
        assert torch.allclose(p.detach(), before[name] - LR * 0.25 * raw[name], rtol=0,
                              atol=1e-15), name
    assert grad_in is None and plain_in is None
    middle, grad_in, _, _ = shrunk_run(0.5, 1, 3)
    _, plain_in, _, _ = shrunk_run(1.0, 1, 3)
    assert middle.grad_scale == 0.5
    assert torch.equal(grad_in[0], plain_in[0]), "the gradient sent back is not shrunk"


def test_grad_shrink_leaves_the_last_stage_alone():
    """beta ** 0 = 1: the last stage, which has no delay, steps with its own gradient."""
    grads = {}
    for beta in (0.5, 1.0):
        stage = Stage(1, 2, block(), sgd, grad_shrink=beta)
        stage.forward_loss(0, data(0), torch.tensor([0, 1, 2, 1, 0]), F.cross_entropy)
        stage.backward(0)
        stage.step(0)
        assert stage.grad_scale == 1.0
        grads[beta] = {n: p.grad for n, p in stage.module.named_parameters()}
    for name, g in grads[0.5].items():
        assert torch.equal(g, grads[1.0][name]), name


def test_end_clock_advances_the_schedule_even_before_the_first_step():
    """Every stage advances every clock so all share lr_t; during warm-up (no step yet) that
    must not warn about calling the scheduler before the optimizer."""
    stage = Stage(0, 3, block(), sgd, lr_scheduler=halving)
    assert stage.lr == LR
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stage.forward(0, data(0))
        stage.end_clock()
        stage.end_clock()
    assert stage.lr == LR / 4 and stage.steps == 0
    assert Stage(0, 1, block(), sgd).lr == LR


def clock(stage: Stage, t: int, clocks: int) -> None:
    """Stage 0 of 3 at clock t: F t (while t < clocks) and B, S of t - 2, seeded per clock."""
    torch.manual_seed(100 + t)
    if t < clocks:
        stage.forward(t, data(t))
    if t >= stage.delay:
        stage.backward(t - stage.delay, (data(50 + t, cols=3),))
        stage.step(t - stage.delay)
    stage.end_clock()


def through_a_file(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_pipeline_state_resumes_in_flight_minibatches_bitwise():
    """Stopped after clock 2 of stage 0 of 3 (minibatches 1 and 2 in flight, dropout in the
    block, momentum and a schedule), a stage built from other weights and loaded from the
    state goes on bitwise as the original: the restored minibatches replay their forwards."""
    clocks = 5
    original = Stage(0, 3, block(dropout=0.3), momentum_sgd, lr_scheduler=halving)
    for t in range(3):
        clock(original, t, clocks)
    state = through_a_file(original.pipeline_state())
    assert [r["minibatch"] for r in state["inflight"]] == [1, 2]
    assert "inflight" not in original.state_dict()
    resumed = Stage(0, 3, block(seed=7, dropout=0.3), momentum_sgd, lr_scheduler=halving)
    resumed.load_pipeline_state(state)
    assert resumed.steps == original.steps == 1 and resumed.lr == original.lr == LR / 8
    assert [p.minibatch for p in resumed.inflight] == [1, 2]
    assert all(p.output is None for p in resumed.inflight)
    for t in range(3, clocks + 2):
        clock(original, t, clocks)
        clock(resumed, t, clocks)
        for (name, a), b in zip(original.module.state_dict().items(),
                                resumed.module.state_dict().values(), strict=True):
            assert torch.equal(a, b), (t, name)
    assert original.steps == resumed.steps == clocks and not resumed.inflight
    momentum = [s["momentum_buffer"] for s in resumed.optimizer.state_dict()["state"].values()]
    assert len(momentum) == 4 and all(m.abs().sum() > 0 for m in momentum)


def test_state_dict_roundtrip_carries_weights_optimizer_schedule_and_steps():
    original = Stage(1, 2, block(), momentum_sgd, lr_scheduler=halving)
    for t in range(3):
        original.forward_loss(t, data(t), torch.tensor([0, 1, 2, 1, 0]), F.cross_entropy)
        original.backward(t)
        original.step(t)
        original.end_clock()
    assert original.inflight_state() == [], "a stage without delay holds nothing between clocks"
    loaded = Stage(1, 2, block(seed=3), momentum_sgd, lr_scheduler=halving)
    loaded.load_state_dict(through_a_file(original.state_dict()))
    assert loaded.steps == 3 and loaded.lr == original.lr == LR / 8
    for (name, a), b in zip(original.module.state_dict().items(),
                            loaded.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(original.optimizer.state_dict()["state"].values(),
                    loaded.optimizer.state_dict()["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert loaded.lr_scheduler.state_dict() == original.lr_scheduler.state_dict()


def test_a_ddg_stage_has_no_gradient_model_to_train():
    stage = Stage(0, 2, block(), sgd)
    with pytest.raises(NotImplementedError, match="Stage has no op G"):
        stage.learn(0, (data(0, cols=3),))
