"""One clock of one stage: the schedule's actions turned into ``Stage`` calls.

Every executor runs stages through :func:`run_stage_clock`; they differ only in their
:class:`Links`, i.e. how an activation or a gradient reaches the neighbouring stage (a dict
in the reference executor, queues between threads, torch.distributed between processes).
That is what makes them agree bitwise: the computation is literally the same code.

An activation travels with the fp16 overflow report of the stages before it, a gradient with
the loss scale its minibatch used (see :mod:`ddgpipe.core.precision`); in fp32 these are
``False`` and ``1.0``.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from torch import Tensor

from ddgpipe.core.schedule import Action
from ddgpipe.core.stage import LossFn, Stage
from ddgpipe.core.timeline import Timeline
from ddgpipe.core.values import Value

__all__ = ["Links", "Grads", "run_stage_clock"]


Grads = tuple[Tensor, ...]
"""The gradients of a stage's marked outputs (or inputs), in order."""


class Links(Protocol):
    """How a stage exchanges tensors with its neighbours and gets its data."""

    def recv_activation(self, stage: Stage, minibatch: int) -> tuple[Value, bool]:
        """The input of ``minibatch`` for ``stage`` (stage 0: the data) and the overflow report."""
        ...

    def send_activation(self, stage: Stage, minibatch: int, out: Value, overflow: bool) -> None:
        """Hand ``stage``'s output of ``minibatch`` to the next stage."""
        ...

    def recv_gradient(self, stage: Stage, minibatch: int) -> tuple[Grads, float]:
        """The gradients of ``stage``'s output of ``minibatch`` and the loss scale they carry."""
        ...

    def send_gradient(self, stage: Stage, minibatch: int, grads: Grads,
                      loss_scale: float) -> None:
        """Hand the gradients w.r.t. ``stage``'s input of ``minibatch`` to the previous stage."""
        ...

    def target(self, stage: Stage, minibatch: int) -> tuple[Tensor, LossFn]:
        """The last stage's target and loss function for ``minibatch``."""
        ...


def _no_guard(stage: Stage, op: str) -> AbstractContextManager:
    return nullcontext()


def run_stage_clock(stage: Stage, actions: list[Action], links: Links, *,
                    guard=_no_guard, timeline: Timeline | None = None,
                    on_loss=None, ends_step: bool = True,
                    end_clock: bool = True) -> Tensor | None:
    """Run ``actions`` (one clock of ``stage``) in order, offer its tied copies' gradients
    to the other copies, then end the stage's clock (``end_clock=False``: the caller does,
    as the reference executor does once every stage has offered). ``ends_step``: the clock
    closes an optimizer step (the LR advances).

    ``guard(stage, op)`` is entered around each computation (not around waits for peers): the
    threaded executor uses it to give a stage that draws random numbers its own stream.
    ``on_loss(minibatch, loss)`` is called as soon as the last stage has the loss, before its
    backward: the threaded executor hands it to the caller from there. ``ends_step``: whether
    the clock closes an optimizer step (:meth:`Schedule.ends_step`; the LR advances). Returns
    the loss when the last stage ran a forward, else None.
    """
    loss = None
    for action in actions:
        start = time.perf_counter()
        m = action.minibatch
        if action.op == "F":
            x, overflow = links.recv_activation(stage, m)
            if stage.is_last:
                y, loss_fn = links.target(stage, m)
                with guard(stage, "F"):
                    loss = stage.forward_loss(m, x, y, loss_fn, overflow)
                if on_loss is not None:
                    on_loss(m, loss)
            else:
                with guard(stage, "F"):
                    out = stage.forward(m, x, overflow)
                links.send_activation(stage, m, out, stage.take_overflow())
        elif action.op == "B":
            grad: Grads | None = None
            scale = 1.0
            if stage.gradient_op == "B" and not stage.is_last:
                grad, scale = links.recv_gradient(stage, m)
            with guard(stage, "B"):
                grad_in = stage.backward(m, grad, scale)
            if not stage.is_first:
                assert grad_in is not None, "a stage after the first returns input gradients"
                links.send_gradient(stage, m, grad_in, stage.grad_loss_scale)
        elif action.op == "S":
            with guard(stage, "S"):
                stage.step(m)
        elif action.op == "G":
            grad, _ = links.recv_gradient(stage, m)
            with guard(stage, "G"):
                stage.learn(m, grad)
        else:
            raise RuntimeError(f"no executor for op {action.op!r} ({action})")
        if timeline is not None:
            timeline.record(action, start, time.perf_counter())
    stage.offer_ties()
    if end_clock:
        stage.end_clock(ends_step)
    return loss
