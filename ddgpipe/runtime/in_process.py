"""What the two executors of one process share: stages, their random number generators
(rng), inference and the checkpoint of a whole pipeline.

Between two clocks their state is the same: every stage's state, each stage's rng, and the
gradients sent during the last clock for a backward of the next one, so a checkpoint of one
resumes under the other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddgpipe.core.rng import StageRngs
from ddgpipe.core.schedule import Schedule
from ddgpipe.core.stage import Stage
from ddgpipe.core.streams import on_stream, receive, send
from ddgpipe.core.values import Value, as_args, tensors
from ddgpipe.runtime.executor import Executor, check_input

__all__ = ["InProcessExecutor"]


class InProcessExecutor(Executor):
    """Every stage of the pipeline in this process (the reference and the threaded executor)."""

    def __init__(self, stages: list[Stage], schedule: Schedule, *,
                 split: list[int] | None = None, split_tuning: dict | None = None):
        super().__init__(stages, schedule, split=split, split_tuning=split_tuning)
        self.rng = StageRngs(self.devices)  # each stage's random numbers

    @property
    def devices(self) -> list[torch.device]:
        return [s.device for s in self.stages]

    def _state(self, grads: list[list]) -> dict:
        return {"clock": self.clock, "fed": self.fed, "grads": grads,
                "stages": [s.pipeline_state() for s in self.stages],
                "stage_rng": self.rng.states}

    def _load_state(self, state: dict) -> list[tuple[int, int, tuple[Tensor, ...], float]]:
        for stage, s in zip(self.stages, state["stages"], strict=True):
            stage.load_pipeline_state(s)
        self.clock, self.fed = state["clock"], state["fed"]
        self.rng.states = state["stage_rng"]
        # format 4 and before sent one gradient tensor; now a list of them
        return [(k, m, tuple(t.to(self.stages[k].device) for t in
                             (g if isinstance(g, list | tuple) else [g])), float(scale))
                for k, m, g, scale in state["grads"]]

    @torch.no_grad()
    def forward_only(self, x: Value | None) -> Value | None:
        """Inference of one batch through every stage (eval mode is the caller's choice)."""
        handoff = send(check_input(x))  # wrapped where it was made: on the caller's stream
        for stage in self.stages:
            with on_stream(stage.device, stage.stream), stage.autocast():
                out = stage.module(*as_args(receive(handoff, stage.device)))
                handoff = send(out)
        return receive(handoff, tensors(out)[0].device)  # usable on the caller's stream
