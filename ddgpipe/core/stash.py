"""Weight stashing: what a stage keeps of a minibatch between its forward and its backward.

=============  ============================================  ===============  ==========
mode           kept per in-flight minibatch                  extra compute    gradient
=============  ============================================  ===============  ==========
``graph``      autograd graph over a weight snapshot         none             exact
``recompute``  each block's input + weight snapshot (+ RNG)  one forward      exact
``none``       input only; replayed with *current* weights   one forward      approximate
=============  ============================================  ===============  ==========

Why and how (the DDG update it serves, shared snapshots, replays): ``docs/design.md``,
"Weight stashing".
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ddgpipe.core.compiled import COMPILE_LOCK, CompiledForward
from ddgpipe.core.rng import rng_kept, rng_state, set_rng_state
from ddgpipe.core.segments import BlockReplay, Boundary
from ddgpipe.core.values import Value, as_args, handed_on, leaves, tensors

__all__ = ["STASH_MODES", "Pending", "Stash", "Snapshot", "updates_unseen"]

STASH_MODES = ("graph", "recompute", "none")


def updates_unseen(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``optimizer`` may change its parameters without bumping their version
    counters: torch's ``fused=True`` kernels do (torch 2.13: SGD, Adam, AdamW)."""
    return optimizer is not None and any(g.get("fused") for g in optimizer.param_groups)


class Snapshot(dict[str, Tensor]):
    """A weight version by parameter name (a dict that a weak reference can point to)."""


@dataclass
class Pending:
    """One in-flight minibatch at one stage: enough to run its backward later."""

    minibatch: int
    inputs: Value | None  # as received, each tensor marked with whether a gradient goes back
    output: Value | None = None  # graph-carrying output (graph mode, or no delay)
    weights: dict[str, Tensor] | None = None  # snapshot leaves the graph or replay uses
    rng_state: dict | None = None  # the random state the forward started from
    # which output tensors were handed on marked for a gradient, and those gradients' shapes
    output_marks: list[bool] = field(default_factory=list)
    grad_shapes: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)
    loss_scale: float = 1.0  # fp16: the scale the last stage applied to this minibatch's loss
    compile_key: Hashable | None = None  # the compiled graph its forward (or replay) ran
    boundaries: list[Boundary] | None = None  # a replay block by block starts from these


class Stash:
    """Runs a stage's forward so that its backward can come ``delay`` optimizer steps later."""

    def __init__(self, module: nn.Module, mode: str, delay: int, needs_input_grad: bool,
                 device: torch.device | None = None,
                 compute_context: Callable[[], AbstractContextManager] = nullcontext,
                 compile: bool = False):
        if mode not in STASH_MODES:
            raise ValueError(f"stash mode {mode!r} is not one of {', '.join(STASH_MODES)}")
        self.module = module
        self.device = device or torch.device("cpu")
        # How every forward and replay runs (the stage's autocast); a fresh context each time.
        self.compute_context = compute_context
        # A replay restores the random state of its forward. The threaded executor turns this
        # off for stages that draw no random numbers, whose replays must not touch the
        # process's generator while other stages draw from it.
        self.restores_rng = True
        # With no delay the backward runs before any step: the live weights are the right
        # version, and plain autograd is both exact and cheapest whatever the mode.
        self.mode = mode if delay > 0 else "live"
        self.needs_input_grad = needs_input_grad
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        # torch.compile of the forward (and with it the backward), weights as inputs
        self.compiled = CompiledForward(module) if compile else None
        self._last_key: Hashable | None = None  # what the compiled call just ran for
        # recompute's replay holds one block's graph at a time (not compiled: that graph is
        # the stage's; not `none`, whose replay recomputes every block at today's weights)
        self.by_blocks = BlockReplay(module, self.device) \
            if self.mode == "recompute" and not compile and BlockReplay.applies(module) \
            else None
        # Share a snapshot while no parameter changed (see the module's docstring). The stage
        # turns this off for optimizers that update in place without bumping the version
        # counters (torch's fused=True kernels).
        self.shares_snapshots = True
        # the last snapshot of the live weights (while a minibatch holds it) and what the
        # parameters were when it was taken
        self._last: weakref.ref[Snapshot] | None = None
        self._last_seen: list[tuple[Tensor, int, int]] = []

    def _seen(self) -> list[tuple[Tensor, int, int]]:
        return [(p, p._version, p.data_ptr()) for p in self.params.values()]

    def _unchanged(self) -> bool:
        return len(self._last_seen) == len(self.params) and all(
            q is p and v == p._version and ptr == p.data_ptr()
            for (q, v, ptr), p in zip(self._last_seen, self.params.values()))

    def _snapshot(self, requires_grad: bool,
                  weights: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        if weights is not None:  # given weights (a prediction) are copied, never shared
            return {n: weights[n].detach().clone().requires_grad_(requires_grad)
                    for n in self.params}
        last = self._last() if self._last is not None and self.shares_snapshots else None
        if last is not None and self._unchanged():
            return last
        snapshot = Snapshot((n, p.detach().clone().requires_grad_(requires_grad))
                            for n, p in self.params.items())
        self._last, self._last_seen = weakref.ref(snapshot), self._seen()
        return snapshot

    def _run(self, weights: dict[str, Tensor] | None, x: Value) -> Value:
        if self.compiled is not None:  # weights as inputs: a new version compiles nothing
            live = dict(self.module.named_parameters()) if weights is None else weights
            out, self._last_key = self.compiled(live, as_args(x))
            return out
        if weights is None:
            return self.module(*as_args(x))
        return functional_call(self.module, weights, as_args(x), strict=False)

    def forward(self, minibatch: int, x: Value,
                weights: dict[str, Tensor] | None = None) -> tuple[Value, Pending]:
        """Forward of one minibatch; returns (output, pending).

        ``weights`` (by parameter name) replace the current ones in this forward and become
        the version the stash keeps (weight prediction); None uses the current weights.
        """
        if self.mode == "live":
            if weights is not None:
                raise ValueError("a stage without delay has nothing to predict")
            xin = leaves(x, self.needs_input_grad)
            with self.compute_context():
                out = self._run(None, xin)
            return out, Pending(minibatch, xin, output=out, compile_key=self._last_key)
        rng = rng_state([self.device])  # the replay (or a checkpoint's rebuild) starts here
        if self.mode == "graph":
            xin = leaves(x, self.needs_input_grad)
            weights = self._snapshot(requires_grad=True, weights=weights)
            with self.compute_context():
                out = self._run(weights, xin)
            return out, Pending(minibatch, xin, output=out, weights=weights, rng_state=rng,
                                compile_key=self._last_key)
        bounds = None
        with torch.no_grad(), self.compute_context():
            # stash none replays with the *live* weights, whatever the forward used
            if self.by_blocks is not None:
                out, bounds = self.by_blocks.forward(x, weights, self.restores_rng)
            else:
                out = self._run(weights, x)
        kept = self._snapshot(requires_grad=False, weights=weights) \
            if self.mode == "recompute" else None
        return out, Pending(minibatch, handed_on(x), weights=kept, rng_state=rng,
                            boundaries=bounds)

    def _replay_leaves(self, pending: Pending) -> tuple[Value, dict[str, Tensor]]:
        """The input and weights a replay backpropagates into: fresh leaves of the stashed
        version (``recompute``; it may be shared with other minibatches, so no flag or grad
        on it) or today's weights (``none``)."""
        assert pending.inputs is not None, "a replay needs the stashed input"
        xin = leaves(pending.inputs, self.needs_input_grad)
        if pending.weights is not None:
            return xin, {n: w.detach().requires_grad_(True) for n, w in pending.weights.items()}
        return xin, dict(self.params)

    def replay(self, pending: Pending) -> Value:
        """Recompute the forward of ``pending`` with grad enabled (``recompute``/``none``)."""
        xin, weights = self._replay_leaves(pending)
        scratch_buffers = {n: b.clone() for n, b in self.module.named_buffers()}
        with rng_kept([self.device]) if self.restores_rng else nullcontext():
            if self.restores_rng:
                assert pending.rng_state is not None
                set_rng_state(pending.rng_state)
            with torch.enable_grad(), self.compute_context():
                out = self._run({**weights, **scratch_buffers}, xin)
        pending.inputs, pending.compile_key = xin, self._last_key
        if pending.weights is None:  # `none` backpropagates straight into the live weights
            return out
        pending.weights = weights
        return out

    def grad_leaves(self, pending: Pending) -> dict[str, Tensor]:
        """The tensors the backward of ``pending`` accumulates gradients into, by parameter
        name: its weight version (``graph``; ``recompute`` once replayed) or the live
        parameters (no delay, ``none``)."""
        return dict(self.params) if pending.weights is None else pending.weights

    def backward(self, pending: Pending, output: Value | None,
                 grad_output: tuple[Tensor, ...] | Tensor | None) -> tuple[Tensor, ...] | None:
        """Backpropagate into the live parameters' ``.grad``; return the gradients w.r.t. the
        input's marked tensors (None for a stage that needs none: the first).

        ``output`` is :meth:`output_for_backward`'s (None: replayed here, block by block);
        ``grad_output`` is the loss's own (None, or the fp16 scale) for the last stage, else
        one gradient per output marked for one, in order.
        """
        for p in self.params.values():
            p.grad = None
        if pending.weights is not None:  # a version shared with another minibatch: no grad
            for w in pending.weights.values():
                w.grad = None
        compiling = self.compiled is not None and \
            self.compiled.backward_needs_lock(pending.compile_key)
        with COMPILE_LOCK if compiling else nullcontext():  # its first backward compiles
            if output is None:
                self._backward_by_blocks(pending, grad_output)
            elif isinstance(grad_output, tuple):
                marked = [t for t, m in zip(tensors(output), pending.output_marks, strict=True)
                          if m]
                # a replay's output may need no gradient where the forward assumed one
                pairs = [(t, g) for t, g in zip(marked, grad_output, strict=True)
                         if t.requires_grad]
                if pairs:
                    torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
            else:
                assert isinstance(output, Tensor), "the last stage's output is the loss"
                torch.autograd.backward(output, grad_output)
        if compiling:
            assert self.compiled is not None
            self.compiled.backward_done(pending.compile_key)
        if pending.weights is not None:
            for name, p in self.params.items():
                p.grad = pending.weights[name].grad
        if not self.needs_input_grad:
            return None
        assert pending.inputs is not None
        return tuple(torch.zeros_like(t) if t.grad is None else t.grad
                     for t in tensors(pending.inputs) if t.requires_grad)

    def _backward_by_blocks(self, pending: Pending, grad_output: object) -> None:
        assert self.by_blocks is not None and pending.boundaries is not None
        assert isinstance(grad_output, tuple) and pending.inputs is not None
        weights = dict(self.params) if pending.weights is None else pending.weights
        scratch_buffers = {n: b.clone() for n, b in self.module.named_buffers()}
        with rng_kept([self.device]) if self.restores_rng else nullcontext():
            self.by_blocks.backward(pending.boundaries, pending.inputs,
                                    {**weights, **scratch_buffers}, pending.output_marks,
                                    grad_output, self.compute_context)
        pending.boundaries = None

    def export(self, pending: Pending) -> dict:
        """A pending minibatch as plain tensors, for a checkpoint.

        A graph cannot be saved, but its input, weight version and RNG state can: restored,
        the backward replays the forward from them (as ``recompute`` does), which gives
        bitwise the gradients the kept graph would have given.
        """
        if pending.output is not None and self.mode == "live":
            raise RuntimeError("a stage without delay has nothing in flight between clocks")
        assert pending.inputs is not None
        weights = None
        if pending.weights is not None:
            weights = {n: w.detach().clone() for n, w in pending.weights.items()}
        inputs = tensors(pending.inputs)
        return {"minibatch": pending.minibatch,
                "inputs": [t.detach().clone() for t in inputs],
                "inputs_tuple": isinstance(pending.inputs, tuple),
                "input_marks": [t.requires_grad for t in inputs],
                "weights": weights, "rng_state": pending.rng_state,
                "output_marks": list(pending.output_marks),
                "grad_shapes": [[list(shape), _dtype_name(dtype)]
                                for shape, dtype in pending.grad_shapes],
                "loss_scale": pending.loss_scale}

    def restore(self, record: dict) -> Pending:
        """The inverse of :meth:`export`: a pending minibatch whose backward will replay."""
        weights = record["weights"]
        if weights is not None:
            weights = {n: w.to(self.device) for n, w in weights.items()}
        if "grad_shapes" in record:
            parts = [t.to(self.device).requires_grad_(mark)
                     for t, mark in zip(record["inputs"], record["input_marks"], strict=True)]
            inputs: Value = tuple(parts) if record["inputs_tuple"] else parts[0]
            shapes = [(tuple(shape), getattr(torch, dtype)) for shape, dtype in
                      record["grad_shapes"]]
            marks = list(record["output_marks"])
        else:  # format 4 and before: one tensor in, one gradient back (none from the last)
            inputs = record["inputs"].to(self.device).requires_grad_(self.needs_input_grad)
            shapes = [(tuple(record["output_shape"]), getattr(torch, record["output_dtype"]))] \
                if record["output_shape"] else []
            marks = [bool(shapes)]
        return Pending(record["minibatch"], inputs, weights=weights,
                       rng_state=record["rng_state"], output_marks=marks, grad_shapes=shapes,
                       loss_scale=record.get("loss_scale", 1.0))

    def output_for_backward(self, pending: Pending) -> Value | None:
        """The graph-carrying output of ``pending``, replaying the forward if it was not kept;
        None for a replay block by block, which :meth:`backward` runs (its leaves are ready)."""
        if pending.output is not None:
            return pending.output
        if pending.boundaries is not None:
            pending.inputs, weights = self._replay_leaves(pending)
            if pending.weights is not None:
                pending.weights = weights
            return None
        return self.replay(pending)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
