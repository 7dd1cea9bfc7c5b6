"""Weight stashing on its own: which weights a delayed backward sees, in every mode.

The oracle is plain autograd through a copy of the module that holds the weights the
backward should use: the stashed version (``graph``, ``recompute``) or the live one
(``none``). A replay must draw the dropout mask of its forward, leave BatchNorm's running
statistics alone, and a pending minibatch must survive export/restore (a checkpoint) with its
input's marks, dtypes and structure.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn

from ddgpipe.core.stash import Pending, Stash

F64 = torch.float64
# the output layer's bias gets sum(grad_out) whatever the weights: the others tell versions apart
WEIGHT_DEPENDENT = ("0.weight", "0.bias", "2.weight")


def mlp(seed: int = 0, dropout: float = 0.0, batchnorm: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 6)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(6))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(6, 3))
    return nn.Sequential(*layers).to(F64)


def data(seed: int, rows: int = 5, cols: int = 4) -> Tensor:
    return torch.randn(rows, cols, dtype=F64, generator=torch.Generator().manual_seed(seed))


def weights_of(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def perturb(module: nn.Module) -> None:
    """What an optimizer step does between a forward and its delayed backward: change the
    live parameters in place."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.5).add_(0.125)


def reference(module: nn.Module, weights: dict[str, Tensor], x: Tensor, grad_out: Tensor):
    """Parameter and input gradients of <grad_out, module(x)> at ``weights``, by plain
    autograd on a copy of ``module``."""
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(weights[name])
    xin = x.detach().requires_grad_(True)
    twin(xin).backward(grad_out)
    return {n: p.grad for n, p in twin.named_parameters()}, xin.grad


def run_backward(stash: Stash, pending: Pending, grad_out: Tensor):
    """B as a stage runs it: one marked output, its gradient; returns the input gradients."""
    pending.output_marks = [True]
    output = stash.output_for_backward(pending)
    return stash.backward(pending, output, (grad_out,))


def live_grads(stash: Stash) -> dict[str, Tensor]:
    return {n: p.grad for n, p in stash.params.items()}


def test_an_unknown_mode_is_refused_naming_the_modes():
    with pytest.raises(ValueError, match="'copy' is not one of graph, recompute, none"):
        Stash(mlp(), "copy", 1, needs_input_grad=False)


@pytest.mark.parametrize("mode", ["graph", "recompute", "none"])
def test_without_delay_every_mode_is_live_autograd(mode):
    """Delay 0: the backward runs before any step, so the stash keeps the graph over the
    live parameters and no weight version, whatever the mode asked."""
    module = mlp()
    stash = Stash(module, mode, 0, needs_input_grad=True)
    assert stash.mode == "live"
    x, g = data(1).requires_grad_(True), data(2, cols=3)
    out, pending = stash.forward(0, x)
    assert out.requires_grad and pending.output is out
    assert pending.weights is None and pending.rng_state is None
    assert stash.grad_leaves(pending) == dict(module.named_parameters())
    grad_in = run_backward(stash, pending, g)
    grads, x_grad = reference(module, weights_of(module), x, g)
    for name, p in module.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    assert len(grad_in) == 1 and torch.equal(grad_in[0], x_grad)
    with pytest.raises(ValueError, match="nothing to predict"):
        stash.forward(1, x, weights_of(module))


def test_what_each_mode_keeps_between_forward_and_backward():
    """graph: the output's graph over a weight snapshot; recompute: the input and a snapshot
    without graph; none: the input only."""
    x = data(1).requires_grad_(True)
    kept = {}
    for mode in ("graph", "recompute", "none"):
        module = mlp()
        out, pending = Stash(module, mode, 2, needs_input_grad=True).forward(7, x)
        assert pending.minibatch == 7 and pending.rng_state is not None
        kept[mode] = (out.requires_grad, pending.output is not None, pending.weights is not None)
        if pending.weights is not None:  # a copy, not the live tensors
            for name, p in module.named_parameters():
                assert pending.weights[name].data_ptr() != p.data_ptr(), name
                assert torch.equal(pending.weights[name], p.detach()), name
    assert kept == {"graph": (True, True, True), "recompute": (False, False, True),
                    "none": (False, False, False)}


@pytest.mark.parametrize("mode", ["graph", "recompute"])
def test_the_delayed_backward_sees_the_stashed_weights_after_they_changed(mode):
    module = mlp()
    stash = Stash(module, mode, 1, needs_input_grad=True)
    x, g = data(1).requires_grad_(True), data(2, cols=3)
    at_forward = weights_of(module)
    _, pending = stash.forward(0, x)
    perturb(module)
    live = weights_of(module)
    grad_in = run_backward(stash, pending, g)
    grads, x_grad = reference(module, at_forward, x, g)
    moved, _ = reference(module, live, x, g)
    for name, p in module.named_parameters():
        assert torch.allclose(p.grad, grads[name], rtol=0, atol=1e-14), name
        if name in WEIGHT_DEPENDENT:  # the weights' change matters
            assert not torch.allclose(p.grad, moved[name]), name
        assert torch.equal(p.detach(), live[name]), "a backward never changes the weights"
    assert torch.allclose(grad_in[0], x_grad, rtol=0, atol=1e-14)


def test_graph_and_recompute_give_bitwise_the_same_gradients():
    x, g = data(1).requires_grad_(True), data(2, cols=3)
    grads, inputs = {}, {}
    for mode in ("graph", "recompute"):
        module = mlp(dropout=0.3)
        stash = Stash(module, mode, 2, needs_input_grad=True)
        torch.manual_seed(5)
        _, pending = stash.forward(0, x)
        perturb(module)
        torch.manual_seed(6)  # what else draws before the backward must not matter
        inputs[mode] = run_backward(stash, pending, g)
        grads[mode] = live_grads(stash)
    for name in grads["graph"]:
        assert torch.equal(grads["graph"][name], grads["recompute"][name]), name
    assert torch.equal(inputs["graph"][0], inputs["recompute"][0])


def test_none_backpropagates_at_the_live_weights():
    """Features Replay's approximation: the replay runs with today's weights and its
    gradients go straight into the live parameters."""
    module = mlp()
    stash = Stash(module, "none", 1, needs_input_grad=True)
    x, g = data(1).requires_grad_(True), data(2, cols=3)
    at_forward = weights_of(module)
    _, pending = stash.forward(0, x)
    perturb(module)
    grads, x_grad = reference(module, weights_of(module), x, g)
    stale, _ = reference(module, at_forward, x, g)
    grad_in = run_backward(stash, pending, g)
    assert pending.weights is None
    for name, p in module.named_parameters():
        assert torch.allclose(p.grad, grads[name], rtol=0, atol=1e-14), name
        if name in WEIGHT_DEPENDENT:
            assert not torch.allclose(p.grad, stale[name]), name
    assert torch.allclose(grad_in[0], x_grad, rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode", ["graph", "recompute"])
def test_predicted_weights_are_the_version_kept(mode):
    """Weights handed to the forward (weight prediction) are the ones the forward and the
    backward use, copied: neither the live weights nor later edits of the given tensors."""
    module = mlp()
    stash = Stash(module, mode, 1, needs_input_grad=True)
    x, g = data(1).requires_grad_(True), data(2, cols=3)
    predicted = {n: w + 0.25 for n, w in weights_of(module).items()}
    expected = {n: w.clone() for n, w in predicted.items()}
    live = weights_of(module)
    out, pending = stash.forward(0, x, predicted)
    for w in predicted.values():
        w.zero_()
    with torch.no_grad():
        assert torch.allclose(out, copy_with(module, expected)(x), rtol=0, atol=1e-14)
    run_backward(stash, pending, g)
    grads, _ = reference(module, expected, x, g)
    for name, p in module.named_parameters():
        assert torch.allclose(p.grad, grads[name], rtol=0, atol=1e-14), name
        assert torch.equal(p.detach(), live[name]), name


def copy_with(module: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(weights[name])
    return twin


def test_each_backward_replaces_the_gradients_of_the_one_before():
    module = mlp()
    stash = Stash(module, "graph", 1, needs_input_grad=False)
    x0, x1, g = data(1), data(3), data(2, cols=3)
    _, first = stash.forward(0, x0)
    _, second = stash.forward(1, x1)
    at_forward = weights_of(module)
    run_backward(stash, first, g)
    assert run_backward(stash, second, g) is None  # the first stage sends no gradient back
    grads, _ = reference(module, at_forward, x1, g)
    for name, p in module.named_parameters():
        assert torch.allclose(p.grad, grads[name], rtol=0, atol=1e-14), name


def test_a_replay_draws_the_dropout_mask_of_its_forward():
    module = mlp(dropout=0.5)
    stash = Stash(module, "recompute", 1, needs_input_grad=True)
    x = data(1).requires_grad_(True)
    torch.manual_seed(11)
    out, pending = stash.forward(0, x)
    torch.rand(1000)  # the process draws on before the backward
    before_replay = torch.get_rng_state()
    replayed = stash.replay(pending)
    assert torch.equal(replayed.detach(), out)
    assert torch.equal(torch.get_rng_state(), before_replay), "the replay puts the state back"
    module.eval()
    with torch.no_grad():
        assert not torch.equal(module(x), out), "the forward drew no mask"


def test_a_replay_without_its_rng_state_draws_another_mask():
    """The contrast that shows the previous test can fail: a stash told not to restore the
    random state replays with whatever the generator holds now."""
    module = mlp(dropout=0.5)
    stash = Stash(module, "recompute", 1, needs_input_grad=True)
    stash.restores_rng = False
    x = data(1).requires_grad_(True)
    torch.manual_seed(11)
    out, pending = stash.forward(0, x)
    torch.rand(1000)
    assert not torch.equal(stash.replay(pending).detach(), out)


@pytest.mark.parametrize("mode", ["graph", "recompute", "none"])
def test_batchnorm_running_stats_update_once_per_minibatch(mode):
    """At the forward, as in backprop; the replay computes on scratch copies of the buffers."""
    module = mlp(batchnorm=True)
    plain = copy.deepcopy(module)
    stash = Stash(module, mode, 2, needs_input_grad=True)
    xs = [data(1).requires_grad_(True), data(3).requires_grad_(True)]
    pendings = [stash.forward(m, x)[1] for m, x in enumerate(xs)]
    with torch.no_grad():
        for x in xs:
            plain(x)
    forward_stats = {n: b.clone() for n, b in module.named_buffers()}
    for pending in pendings:
        run_backward(stash, pending, data(2, cols=3))
    bn = module[1]
    assert int(bn.num_batches_tracked) == 2
    for name, b in module.named_buffers():
        assert torch.equal(b, forward_stats[name]), f"{name} moved in the backward"
        assert torch.allclose(b, dict(plain.named_buffers())[name], rtol=0, atol=1e-15), name
    assert not torch.equal(bn.running_mean, torch.zeros(6, dtype=F64))


class Gate(nn.Module):
    """Takes a tuple (features, a float scale that carries no gradient, a bool mask)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor, scale: Tensor, mask: Tensor) -> Tensor:
        return self.drop(self.linear(x * scale)) * mask.unsqueeze(1)


def gate_inputs() -> tuple[Tensor, Tensor, Tensor]:
    x = data(1).requires_grad_(True)  # marked: its gradient goes back
    scale = data(4, cols=1)  # floating, but not marked
    mask = torch.tensor([True, False, True, True, False])
    return x, scale, mask


def through_a_file(record: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(record, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_export_restore_of_a_tuple_input_replays_bitwise():
    """A checkpoint of a graph-mode minibatch: only the marked floating tensor requires grad
    again, the bool mask stays bool, and the restored backward (a replay) gives bitwise the
    kept graph's gradients, dropout included, after the live weights changed."""
    torch.manual_seed(0)
    module = Gate().to(F64)
    stash = Stash(module, "graph", 1, needs_input_grad=True)
    torch.manual_seed(21)
    _, pending = stash.forward(3, gate_inputs())
    pending.output_marks = [True]
    pending.grad_shapes = [((5, 3), F64)]
    pending.loss_scale = 8.0
    record = through_a_file(stash.export(pending))
    assert record["input_marks"] == [True, False, False] and record["inputs_tuple"]
    assert record["grad_shapes"] == [[[5, 3], "float64"]]
    restored = stash.restore(record)
    assert restored.minibatch == 3 and restored.loss_scale == 8.0
    assert restored.output is None, "a restored minibatch replays"
    assert restored.output_marks == [True] and restored.grad_shapes == [((5, 3), F64)]
    assert isinstance(restored.inputs, tuple) and len(restored.inputs) == 3
    assert [t.requires_grad for t in restored.inputs] == [True, False, False]
    assert [t.dtype for t in restored.inputs] == [F64, F64, torch.bool]
    for a, b in zip(restored.inputs, pending.inputs, strict=True):
        assert torch.equal(a, b.detach())
    perturb(module)
    g = data(2, cols=3)
    torch.manual_seed(99)
    grad_in = run_backward(stash, pending, g)
    kept = {n: p.grad.clone() for n, p in module.named_parameters()}
    restored_in = run_backward(stash, restored, g)
    assert len(grad_in) == len(restored_in) == 1  # only x carries a gradient back
    assert torch.equal(grad_in[0], restored_in[0])
    for name, p in module.named_parameters():
        assert torch.equal(p.grad, kept[name]), name
    assert (kept["linear.weight"] != 0).any()


def test_an_export_holds_copies_of_the_weight_version():
    module = mlp()
    stash = Stash(module, "recompute", 1, needs_input_grad=True)
    _, pending = stash.forward(0, data(1).requires_grad_(True))
    record = stash.export(pending)
    snapshot = {n: w.clone() for n, w in pending.weights.items()}
    for w in pending.weights.values():
        w.add_(1.0)
    for name, w in record["weights"].items():
        assert torch.equal(w, snapshot[name]), name
    assert record["weights"].keys() == dict(module.named_parameters()).keys()


def test_a_live_pending_cannot_be_exported():
    stash = Stash(mlp(), "graph", 0, needs_input_grad=False)
    _, pending = stash.forward(0, data(1))
    with pytest.raises(RuntimeError, match="nothing in flight"):
        stash.export(pending)


def test_a_record_of_the_old_one_tensor_format_restores():
    """Checkpoints of format 4 and before: one input tensor, one output shape."""
    stash = Stash(mlp(), "recompute", 1, needs_input_grad=True)
    x = data(1)
    record = {"minibatch": 2, "inputs": x, "weights": None, "rng_state": None,
              "output_shape": [5, 3], "output_dtype": "float64"}
    pending = stash.restore(record)
    assert pending.inputs.requires_grad and torch.equal(pending.inputs, x)
    assert pending.output_marks == [True] and pending.grad_shapes == [((5, 3), F64)]
    assert pending.loss_scale == 1.0
    last = stash.restore(record | {"output_shape": None})
    assert last.output_marks == [False] and last.grad_shapes == []


def test_grad_leaves_are_where_the_backward_accumulates():
    """graph and recompute: the minibatch's own weight version; none: the live parameters."""
    x, g = data(1).requires_grad_(True), data(2, cols=3)
    for mode in ("graph", "recompute", "none"):
        module = mlp()
        stash = Stash(module, mode, 1, needs_input_grad=True)
        _, pending = stash.forward(0, x)
        before = stash.grad_leaves(pending)
        if mode == "none":
            assert before == dict(module.named_parameters())
            continue
        assert before.keys() == dict(module.named_parameters()).keys()
        assert all(before[n] is not p for n, p in module.named_parameters()), mode
        run_backward(stash, pending, g)
        leaves = stash.grad_leaves(pending)
        for name, p in module.named_parameters():
            assert leaves[name].grad is p.grad, (mode, name)  # handed over, not copied
            assert leaves[name].requires_grad, (mode, name)
