"""What the two executors of one process share: stages, their random streams, inference and
the checkpoint of a whole pipeline.

Between two clocks their state is the same: every stage's state, each stage's random
stream, and the gradients sent during the last clock for a backward of the next one, so a
checkpoint of one resumes under the other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddgpipe.core.rng import StageStreams
from ddgpipe.core.stage import Stage
from ddgpipe.core.streams import on_stream, receive, send
from ddgpipe.runtime.executor import Executor

__all__ = ["InProcessExecutor"]


class InProcessExecutor(Executor):
    """Every stage of the pipeline in this process (the reference and the threaded executor)."""

    def __init__(self, stages: list[Stage], method: str = "ddg"):
        super().__init__(stages, method)
        self.streams = StageStreams(self.devices)

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
    def forward_only(self, x: Tensor | None) -> Tensor | None:
        """Inference of one batch through every stage (eval mode is the caller's choice)."""
        handoff = send(x)  # wrapped where it was made: on the caller's stream
        for stage in self.stages:
            with on_stream(stage.device, stage.stream), stage._autocast():
                out = stage.module(receive(handoff, stage.device))
                handoff = send(out)
        return receive(handoff, out.device)  # usable on the caller's stream
