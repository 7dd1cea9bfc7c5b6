"""One pipeline stage: a slice of the network, its optimizer, LR schedule and weight stash.

A stage computes on tensors and knows nothing of processes: the reference executor calls it
in one process, the distributed runtime calls the very same methods on one rank each, which
is why the two agree bitwise.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ddgpipe.compensation import Compensation
from ddgpipe.errors import UsageError
from ddgpipe.stash import Pending, Stash

__all__ = ["Stage", "OptimizerFactory", "SchedulerFactory"]

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], object]
LossFn = Callable[[Tensor, Tensor], Tensor]


class Stage:
    """Stage ``index`` of ``num_stages``; its backward lags its forward by ``delay`` clocks.

    ``grad_shrink`` (beta) scales the delayed gradient by ``beta ** delay`` before the step,
    the gradient shrinking of the authors' follow-up FDG; 1.0 is the paper's DDG.
    """

    #: the op that consumes the gradient stage k+1 sends back: DDG's delayed backward
    gradient_op = "B"

    def __init__(
        self,
        index: int,
        num_stages: int,
        module: nn.Module,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        stash: str = "graph",
        grad_shrink: float = 1.0,
        delay: int | None = None,
        compensation: Compensation | None = None,
    ):
        self.index = index
        self.num_stages = num_stages
        self.delay = num_stages - 1 - index if delay is None else delay
        self.module = module
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = optimizer(params)
        self.lr_scheduler = lr_scheduler(self.optimizer) if lr_scheduler else None
        self.stash = Stash(module, stash, self.delay, needs_input_grad=index > 0)
        self.grad_scale = grad_shrink**self.delay
        self.inflight: deque[Pending] = deque()
        self.steps = 0
        self.compensation = compensation or Compensation()
        self.compensation.bind(self)
        self._forward_weights: dict[str, Tensor] | None = None  # of the minibatch B just ran

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def _forward(self, minibatch: int, x: Tensor) -> tuple[Tensor, Pending]:
        weights = self.compensation.forward_weights() if self.delay > 0 else None
        try:
            return self.stash.forward(minibatch, x, weights)
        except RuntimeError as e:  # shape/dtype mismatches surface as RuntimeError in torch
            if self.is_first or "shape" in str(e) or "size" in str(e):
                raise UsageError(
                    f"stage {self.index} cannot take an input of shape {tuple(x.shape)} "
                    f"({str(e).splitlines()[0]}); check the data against the model's "
                    "expected input"
                ) from None
            raise

    def forward(self, minibatch: int, x: Tensor) -> Tensor:
        """F: run minibatch ``minibatch`` with the current weights; return the activation."""
        out, pending = self._forward(minibatch, x)
        pending.output_shape = tuple(out.shape)
        self.inflight.append(pending)
        return out.detach()

    def forward_loss(self, minibatch: int, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        """F of the last stage: the forward and the loss, kept for this clock's backward."""
        out, pending = self._forward(minibatch, x)
        loss = loss_fn(out, y)
        if loss.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar (got shape {tuple(loss.shape)}); "
                "reduce it, e.g. F.cross_entropy(out, y) with reduction='mean'"
            )
        pending.output = loss
        self.inflight.append(pending)
        return loss.detach()

    def backward(self, minibatch: int, grad_output: Tensor | None = None) -> Tensor | None:
        """B: backpropagate minibatch ``minibatch`` through its stashed weights.

        ``grad_output`` is the gradient of the loss w.r.t. this stage's output (None for the
        last stage, whose output is the loss). Returns the gradient w.r.t. the input, or None
        for the first stage.
        """
        pending = self.inflight.popleft()
        if pending.minibatch != minibatch:
            raise RuntimeError(
                f"stage {self.index}: backward of minibatch {minibatch} but the oldest "
                f"in-flight minibatch is {pending.minibatch}"
            )
        replayed = self.delay > 0 and self.stash.mode == "none"
        if replayed:  # None replays at the live weights; a compensation may estimate older ones
            pending.weights = self.compensation.replay_weights()
        output = self.stash.output_for_backward(pending)
        grad_in = self.stash.backward(pending, output, grad_output)
        self._forward_weights = None if replayed else pending.weights
        if self.grad_scale != 1.0:
            for p in self.stash.params.values():
                if p.grad is not None:
                    p.grad.mul_(self.grad_scale)
        return grad_in

    def step(self, minibatch: int) -> None:
        """S: apply the gradient of minibatch ``minibatch`` (through the compensation)."""
        if self.delay > 0:
            self.compensation.step(self._forward_weights)
        else:
            self.optimizer.step()
        self._forward_weights = None
        self.steps += 1

    def end_clock(self) -> None:
        """Advance the LR schedule: every stage advances every clock, so all share lr_t."""
        if self.lr_scheduler is None:
            return
        with warnings.catch_warnings():
            # During warm-up a stage has not stepped yet; the schedule must still advance.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.lr_scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "steps": self.steps,
            "compensation": self.compensation.state_dict(),
        }

    def pipeline_state(self) -> dict:
        """``state_dict`` plus the in-flight minibatches: everything to resume mid-pipeline."""
        return self.state_dict() | {"inflight": [self.stash.export(p) for p in self.inflight]}

    def load_pipeline_state(self, state: dict) -> None:
        self.load_state_dict(state)
        self.inflight = deque(self.stash.restore(r) for r in state["inflight"])

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.steps = state.get("steps", 0)
        self.compensation.load_state_dict(state.get("compensation", {}))
