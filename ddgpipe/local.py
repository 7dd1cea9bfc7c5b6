"""The reference executor: every stage in one process, clock by clock, walking the schedule.

It is the definition the parallel runtime is tested against (bitwise), so it stays simple:
activations of a clock flow forward through a dict, gradients wait one clock in another.
Each stage draws its random numbers (dropout, a DNI gradient model's initial weights) from a
stream of its own, as it does under the runtime where each stage is a process with its own
RNG; one shared stream would interleave the stages' draws in an order no runtime has.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import Tensor

from ddgpipe.rng import rng_kept, rng_state, set_rng_state
from ddgpipe.schedule import Action, ddg_actions, dni_actions, num_clocks
from ddgpipe.stage import LossFn, Stage
from ddgpipe.timeline import Timeline

__all__ = ["LocalExecutor"]

ACTIONS: dict[str, Callable[..., list[Action]]] = {"ddg": ddg_actions, "dni": dni_actions}


class LocalExecutor:
    """Runs ``stages`` in one process following the schedule of ``method`` (ddg or dni)."""

    def __init__(
        self,
        stages: list[Stage],
        method: str = "ddg",
        timeline: Timeline | None = None,
    ):
        self.stages = stages
        self.method = method
        self.actions_at = ACTIONS[method]
        self.timeline = timeline
        self.clock = 0  # the next clock to run
        self.fed = 0  # minibatches fed so far
        self._grads: dict[tuple[int, int], Tensor] = {}  # (stage, minibatch) -> grad of output
        self._rng: list[dict] | None = None  # each stage's RNG stream, from the first clock on

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def step(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        """One clock with a new minibatch; returns its loss (computed by the last stage)."""
        if self.clock != self.fed:
            raise RuntimeError(
                "this pipeline was drained; drain() ends training, so build a new DDG to go on "
                "(evaluation needs no drain: use pipe.eval() and pipe.model)"
            )
        loss = self._run_clock(None, x, y, loss_fn)
        self.fed += 1
        return loss

    def drain(self) -> None:
        """Run the pending backwards and steps; no new forwards."""
        while self.clock < num_clocks(self.num_stages, self.fed, self.method):
            self._run_clock(self.fed, None, None, None)

    def checkpoint_state(self) -> dict:
        """Between two clocks: every stage's state and the gradients waiting for a stage."""
        if self.method != "ddg":
            raise NotImplementedError("checkpoints support ddg and bp, not dni")
        return {"clock": self.clock, "fed": self.fed,
                "grads": [[k, m, g] for (k, m), g in self._grads.items()],
                "stages": [s.pipeline_state() for s in self.stages],
                "stage_rng": self._rng}

    def load_checkpoint_state(self, state: dict) -> None:
        for stage, s in zip(self.stages, state["stages"], strict=True):
            stage.load_pipeline_state(s)
        self.clock, self.fed = state["clock"], state["fed"]
        self._grads = {(k, m): g for k, m, g in state["grads"]}
        self._rng = state["stage_rng"]

    def _run_clock(self, total: int | None, x, y, loss_fn) -> Tensor | None:
        if self._rng is None:  # every stage's stream starts where a worker's would: here
            start = rng_state()
            self._rng = [start] * self.num_stages
        with rng_kept():  # the caller's own stream is not the stages' business
            return self._run_stages(total, x, y, loss_fn)

    def _run_stages(self, total: int | None, x, y, loss_fn) -> Tensor | None:
        activation, loss = x, None
        for stage in self.stages:
            set_rng_state(self._rng[stage.index])
            for action in self.actions_at(stage.index, self.num_stages, self.clock, total):
                start = time.perf_counter()
                if action.op == "F":
                    if stage.is_last:
                        loss = stage.forward_loss(action.minibatch, activation, y, loss_fn)
                    else:
                        activation = stage.forward(action.minibatch, activation)
                elif action.op == "B":
                    grad = None
                    if stage.gradient_op == "B" and not stage.is_last:
                        grad = self._grads.pop((stage.index, action.minibatch))
                    grad_in = stage.backward(action.minibatch, grad)
                    if not stage.is_first:
                        self._grads[(stage.index - 1, action.minibatch)] = grad_in
                elif action.op == "S":
                    stage.step(action.minibatch)
                elif action.op == "G":
                    grad = self._grads.pop((stage.index, action.minibatch))
                    stage.learn(action.minibatch, grad)
                else:
                    raise RuntimeError(f"no executor for op {action.op!r} ({action})")
                if self.timeline is not None:
                    self.timeline.record(action, start, time.perf_counter())
            self._rng[stage.index] = rng_state()
        for stage in self.stages:
            stage.end_clock()
        self.clock += 1
        return loss
