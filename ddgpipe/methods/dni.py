"""Decoupled Neural Interfaces with synthetic gradients (Jaderberg et al. 2017): the baseline.

Why and how: ``docs/design.md``, "DNI, the synthetic-gradient baseline".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddgpipe.core.precision import check_precision
from ddgpipe.core.schedule import DNISchedule
from ddgpipe.core.stage import OptimizerFactory, SchedulerFactory, Stage
from ddgpipe.core.timeline import Timeline
from ddgpipe.core.values import Value, describe
from ddgpipe.errors import UsageError
from ddgpipe.methods.pipeline import PipelineMethod
from ddgpipe.methods.traced import pipeline_blocks
from ddgpipe.runtime.build import build_stages
from ddgpipe.runtime.placement import Placement

__all__ = ["DNI", "DNIStage", "synthetic_gradient_model"]


def synthetic_gradient_model(sample_output: Tensor, hidden: int = 64) -> nn.Module:
    """A small network mapping an activation to a same-shaped gradient estimate."""
    last: nn.Conv2d | nn.Linear
    if sample_output.dim() == 4:
        channels = sample_output.shape[1]
        last = nn.Conv2d(hidden, channels, 3, padding=1)
        net = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden),
                            nn.ReLU(), last)
    else:
        features = sample_output[0].numel()
        last = nn.Linear(hidden * 4, features)
        net = nn.Sequential(nn.Flatten(), nn.Linear(features, hidden * 4), nn.ReLU(), last,
                            nn.Unflatten(1, tuple(sample_output.shape[1:])))
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)  # type: ignore[arg-type]  # both layers have a bias
    return net


class DNIStage(Stage):
    """A stage that updates from a synthetic gradient and learns it one clock later."""

    gradient_op = "G"

    def __init__(self, *args: Any, sg_lr: float = 1e-3, **kwargs: Any):
        super().__init__(*args, **kwargs | {"delay": 0})
        self.sg_lr = sg_lr
        self._sg: tuple[nn.Module, torch.optim.Optimizer] | None = None
        self._outputs: dict[int, Tensor] = {}  # minibatch -> output, until its true gradient

    def _gradient_model(self, out: Tensor) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The gradient model and its Adam, built for the shape of the first output."""
        if self._sg is None:
            model = synthetic_gradient_model(out).to(self.device)
            self._sg = model, torch.optim.Adam(model.parameters(), lr=self.sg_lr)
        return self._sg

    def forward(self, minibatch: int, x: Value, overflow: bool = False) -> Value:
        sent = super().forward(minibatch, x, overflow)
        if not isinstance(sent, Tensor):
            raise UsageError(f"dni stage {self.index} outputs {describe(sent)}, but a gradient "
                             "model predicts the gradient of one tensor: end the stage on a "
                             "block that returns one tensor, or use --method ddg")
        out = sent.detach()
        self._gradient_model(out)
        self._outputs[minibatch] = out
        return sent

    def backward(self, minibatch: int, grad_output: tuple[Tensor, ...] | None = None,
                 loss_scale: float = 1.0) -> tuple[Tensor, ...] | None:
        if not self.is_last:
            out = self._outputs[minibatch]
            with torch.no_grad():
                grad_output = (self._gradient_model(out)[0](out) / out.shape[0],)
        return super().backward(minibatch, grad_output, loss_scale)

    def learn(self, minibatch: int, true_grad: tuple[Tensor, ...]) -> None:
        """G: regress the gradient model onto the gradient stage k+1 sent back."""
        out = self._outputs.pop(minibatch)
        model, optimizer = self._gradient_model(out)
        loss = F.mse_loss(model(out), true_grad[0] * out.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.last_sg_loss = loss.item()


class DNI(PipelineMethod):
    """Train a network cut into ``stages`` modules with synthetic gradients.

    Takes the arguments of :class:`~ddgpipe.methods.ddg.DDG` that apply (no stash, no
    compensation), the model (any traceable module), ``split_points`` and the placement
    keywords included, and ``sg_lr``, the learning rate of the gradient models' Adam.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: int,
        optimizer: OptimizerFactory,
        *,
        lr_scheduler: SchedulerFactory | None = None,
        sample_input: Tensor | None = None,
        split_points: Sequence[str] | None = None,
        sg_lr: float = 1e-3,
        timeline: Timeline | None = None,
        check_finite: bool = True,
        precision: str = "fp32",
        placement: Placement | None = None,
        **where: Any,
    ):
        if check_precision(precision) == "fp16":
            raise UsageError("dni's synthetic gradients are not loss-scaled, so fp16 would "
                             "underflow them; use --precision bf16 or fp32")

        def make_stage(k: int, num_stages: int, module: nn.Module,
                       device: torch.device) -> DNIStage:
            return DNIStage(k, num_stages, module, optimizer, lr_scheduler, sg_lr=sg_lr,
                            device=device, precision=precision)

        schedule = DNISchedule(stages)
        placed = Placement.of(placement, **where).check()
        # a remembered cut is kept under the schedule's name in place of a stash mode
        blocks = pipeline_blocks(model, stages, sample_input=sample_input,
                                 split_points=split_points)
        executor = build_stages(blocks, schedule, make_stage, placed, sample_input=sample_input,
                                timeline=timeline, stash_precision=(schedule.name, precision))
        super().__init__(model, executor, check_finite)
