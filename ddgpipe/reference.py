"""The reference executor: every stage in one thread, clock by clock, walking the schedule.

It is the definition the threaded executor and the process runtime are tested against
(bitwise), so it stays simple: stage 0 .. K-1 run their clock in turn, activations of a clock
flow forward through a dict, gradients wait one clock in another. Each stage draws its random
numbers (dropout, a DNI gradient model's initial weights) from a stream of its own, as it does
under the runtime where each stage is a process with its own generator; one shared stream
would interleave the stages' draws in an order no parallel executor has. Each stage computes
on its own device (and CUDA stream); tensors cross devices as in the threaded executor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddgpipe.clock import run_stage_clock
from ddgpipe.rng import StageStreams
from ddgpipe.schedule import ACTIONS, num_clocks
from ddgpipe.stage import LossFn, Stage
from ddgpipe.streams import Handoff, on_stream, receive, send
from ddgpipe.timeline import Timeline

__all__ = ["ReferenceExecutor", "InProcessState"]


class InProcessState:
    """What the in-process executors share: the stages, their streams, inference, checkpoints.

    Between two clocks their state is the same: every stage's state, each stage's random
    stream, and the gradients sent during the last clock for a backward of the next one.
    """

    stages: list[Stage]
    streams: StageStreams
    method: str
    clock: int
    fed: int

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def devices(self) -> list[torch.device]:
        return [s.device for s in self.stages]

    def _check_ddg(self) -> None:
        if self.method != "ddg":
            raise NotImplementedError("checkpoints support ddg and bp, not dni")

    def _state(self, grads: list[list]) -> dict:
        return {"clock": self.clock, "fed": self.fed, "grads": grads,
                "stages": [s.pipeline_state() for s in self.stages],
                "stage_rng": self.streams.states}

    def _load_state(self, state: dict) -> list[tuple[int, int, Tensor, float]]:
        for stage, s in zip(self.stages, state["stages"], strict=True):
            stage.load_pipeline_state(s)
        self.clock, self.fed = state["clock"], state["fed"]
        self.streams.states = state["stage_rng"]
        return [(k, m, g.to(self.stages[k].device), float(scale))
                for k, m, g, scale in state["grads"]]

    @torch.no_grad()
    def forward_only(self, x: Tensor) -> Tensor:
        """Inference of one batch through every stage (eval mode is the caller's choice)."""
        handoff = send(x)  # wrapped where it was made: on the caller's stream
        for stage in self.stages:
            with on_stream(stage.device, stage.stream), stage._autocast():
                out = stage.module(receive(handoff, stage.device))
                handoff = send(out)
        return receive(handoff, out.device)  # usable on the caller's stream


class ReferenceExecutor(InProcessState):
    """Runs ``stages`` in one thread following the schedule of ``method`` (ddg or dni)."""

    def __init__(self, stages: list[Stage], method: str = "ddg",
                 timeline: Timeline | None = None):
        self.stages = stages
        self.method = method
        self.actions_at = ACTIONS[method]
        self.timeline = timeline
        self.clock = 0  # the next clock to run
        self.fed = 0  # minibatches fed so far
        self.streams = StageStreams(self.devices)
        self._acts: dict[tuple[int, int], tuple[Handoff, bool]] = {}
        self._grads: dict[tuple[int, int], tuple[Handoff, float]] = {}
        self._target: tuple[Handoff, LossFn] | None = None

    def step(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        """One clock with a new minibatch; returns its loss (computed by the last stage)."""
        if self.clock != self.fed:
            raise RuntimeError(
                "this pipeline was drained; drain() ends training, so build a new DDG to go on "
                "(evaluation needs no drain: use pipe.eval() and pipe.model)"
            )
        self._acts[(0, self.fed)] = (send(x), False)
        self._target = (send(y), loss_fn)
        loss = self._run_clock(None)
        self.fed += 1
        return loss

    def drain(self) -> None:
        """Run the pending backwards and steps; no new forwards."""
        while self.clock < num_clocks(self.num_stages, self.fed, self.method):
            self._run_clock(self.fed)

    def sync(self) -> None:
        """Nothing runs between calls here."""

    def close(self) -> None:
        """Nothing to stop."""

    def checkpoint_state(self) -> dict:
        """Between two clocks: every stage's state and the gradients waiting for a stage."""
        self._check_ddg()
        return self._state([[k, m, h.tensor, scale] for (k, m), (h, scale) in self._grads.items()])

    def load_checkpoint_state(self, state: dict) -> None:
        self._grads = {(k, m): (Handoff(g), scale) for k, m, g, scale in self._load_state(state)}

    def _run_clock(self, total: int | None) -> Tensor | None:
        self.streams.start()
        loss = None
        for stage in self.stages:
            actions = self.actions_at(stage.index, self.num_stages, self.clock, total)
            with self.streams.use(stage.index), on_stream(stage.device, stage.stream):
                out = run_stage_clock(stage, actions, self, timeline=self.timeline)
            loss = out if out is not None else loss
        self.clock += 1
        return loss

    # --- links: in-process dicts ------------------------------------------------------------

    def recv_activation(self, stage: Stage, minibatch: int) -> tuple[Tensor, bool]:
        handoff, overflow = self._acts.pop((stage.index, minibatch))
        return receive(handoff, stage.device), overflow

    def send_activation(self, stage: Stage, minibatch: int, out: Tensor, overflow: bool) -> None:
        self._acts[(stage.index + 1, minibatch)] = (send(out), overflow)

    def recv_gradient(self, stage: Stage, minibatch: int) -> tuple[Tensor, float]:
        handoff, scale = self._grads.pop((stage.index, minibatch))
        return receive(handoff, stage.device), scale

    def send_gradient(self, stage: Stage, minibatch: int, grad: Tensor, loss_scale: float) -> None:
        self._grads[(stage.index - 1, minibatch)] = (send(grad), loss_scale)

    def target(self, stage: Stage, minibatch: int) -> tuple[Tensor, LossFn]:
        handoff, loss_fn = self._target
        return receive(handoff, stage.device), loss_fn
