"""The reference executor: every stage in one thread, clock by clock, walking the schedule.

It is the definition the threaded executor and the process runtime are tested against
(bitwise), so it stays simple: stage 0 .. K-1 run their clock in turn, activations of a clock
flow forward through a dict, gradients wait one clock in another. Each stage draws its random
numbers (dropout, a DNI gradient model's initial weights) from an rng of its own, as it does
under the runtime where each stage is a process with its own generator; one shared rng
would interleave the stages' draws in an order no parallel executor has. Each stage computes
on its own device (and CUDA stream); tensors cross devices as in the threaded executor.
"""

from __future__ import annotations

from torch import Tensor

from ddgpipe.core.clock import Grads, run_stage_clock
from ddgpipe.core.schedule import Schedule
from ddgpipe.core.stage import LossFn, Stage
from ddgpipe.core.streams import Handoff, on_stream, receive, send
from ddgpipe.core.timeline import Timeline
from ddgpipe.core.values import Value, tensors
from ddgpipe.runtime.executor import check_feed, tensor_of, tensors_of
from ddgpipe.runtime.in_process import InProcessExecutor

__all__ = ["ReferenceExecutor", "DictLinks"]


class DictLinks:
    """The reference executor's links: a clock's activations flow forward through one dict,
    gradients wait a clock in another, and the caller's target waits in a slot."""

    def __init__(self) -> None:
        self.acts: dict[tuple[int, int], tuple[Handoff, bool]] = {}
        self.grads: dict[tuple[int, int], tuple[Handoff, float]] = {}
        self.fed_target: tuple[Handoff, LossFn] | None = None

    def feed(self, minibatch: int, x: Value, y: Tensor, loss_fn: LossFn) -> None:
        """The caller's minibatch: stage 0's input and the last stage's target."""
        self.acts[(0, minibatch)] = (send(x), False)
        self.fed_target = (send(y), loss_fn)

    def recv_activation(self, stage: Stage, minibatch: int) -> tuple[Value, bool]:
        handoff, overflow = self.acts.pop((stage.index, minibatch))
        return receive(handoff, stage.device), overflow

    def send_activation(self, stage: Stage, minibatch: int, out: Value, overflow: bool) -> None:
        self.acts[(stage.index + 1, minibatch)] = (send(out), overflow)

    def recv_gradient(self, stage: Stage, minibatch: int) -> tuple[Grads, float]:
        handoff, scale = self.grads.pop((stage.index, minibatch))
        return tensors_of(receive(handoff, stage.device)), scale

    def send_gradient(self, stage: Stage, minibatch: int, grads: Grads,
                      loss_scale: float) -> None:
        self.grads[(stage.index - 1, minibatch)] = (send(grads), loss_scale)

    def target(self, stage: Stage, minibatch: int) -> tuple[Tensor, LossFn]:
        assert self.fed_target is not None, "a target is fed with every minibatch"
        handoff, loss_fn = self.fed_target
        return tensor_of(receive(handoff, stage.device)), loss_fn


class ReferenceExecutor(InProcessExecutor):
    """Runs ``stages`` in one thread, clock by clock, along ``schedule``."""

    kind = "reference"

    def __init__(self, stages: list[Stage], schedule: Schedule,
                 timeline: Timeline | None = None, *, split: list[int] | None = None,
                 split_tuning: dict | None = None):
        super().__init__(stages, schedule, split=split, split_tuning=split_tuning)
        self.timeline = timeline
        self.links = DictLinks()

    def step(self, x: Value | None, y: Tensor | None, loss_fn: LossFn | None) -> Tensor | None:
        """One clock with a new minibatch; returns its loss (computed by the last stage)."""
        x, y, loss_fn = check_feed(x, y, loss_fn)
        if self.clock != self.fed:
            raise RuntimeError(
                "this pipeline was drained; drain() ends training, so build a new DDG to go on "
                "(evaluation needs no drain: use pipe.eval() and pipe.model)"
            )
        self.links.feed(self.fed, x, y, loss_fn)
        loss = self._run_clock(None)
        self.fed += 1
        return loss

    def drain(self) -> None:
        """Run the pending backwards and steps; no new forwards; then each stage's finish."""
        while self.clock < self.schedule.clocks(self.fed):
            self._run_clock(self.fed)
        for stage in self.stages:
            with on_stream(stage.device, stage.stream):
                stage.finish()

    def checkpoint_state(self) -> dict:
        """Between two clocks: every stage's state and the gradients waiting for a stage."""
        self._check_checkpoints()
        return self._state([[k, m, list(tensors(h.value)), scale]
                            for (k, m), (h, scale) in self.links.grads.items()])

    def load_checkpoint_state(self, state: dict) -> None:
        self.links.grads = {(k, m): (Handoff(g), scale)
                            for k, m, g, scale in self._load_state(state)}

    def _run_clock(self, total: int | None) -> Tensor | None:
        self.rng.start()
        loss = None
        for stage in self.stages:
            actions = self.schedule.actions(stage.index, self.clock, total)
            with self.rng.use(stage.index), on_stream(stage.device, stage.stream):
                out = run_stage_clock(stage, actions, self.links, timeline=self.timeline,
                                      end_clock=False)
            loss = out if out is not None else loss
        ends_step = self.schedule.ends_step(self.clock)
        for stage in self.stages:  # every tied copy has offered this clock's gradients
            with on_stream(stage.device, stage.stream):
                stage.end_clock(ends_step)
        self.clock += 1
        return loss
