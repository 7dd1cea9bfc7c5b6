"""Plain backpropagation: the baseline, and the reference DDG with K = 1 must equal bitwise."""

from __future__ import annotations

import math

from torch import Tensor, nn

from ddgpipe.errors import NonFiniteLossError
from ddgpipe.stage import LossFn, OptimizerFactory, SchedulerFactory

__all__ = ["Backprop"]


class Backprop:
    """``zero_grad; forward; loss; backward; step; scheduler.step`` once per call to ``step``."""

    num_stages = 1

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        *,
        lr_scheduler: SchedulerFactory | None = None,
        check_finite: bool = True,
    ):
        self.model = model
        self.optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
        self.lr_scheduler = lr_scheduler(self.optimizer) if lr_scheduler else None
        self.check_finite = check_finite
        self.fed = 0

    def step(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(x), y)
        if self.check_finite and not math.isfinite(loss.item()):
            raise NonFiniteLossError(loss.item(), self.fed)
        loss.backward()
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.fed += 1
        return loss.detach()

    def drain(self) -> None:
        """Nothing is in flight in backprop."""

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self) -> Backprop:
        self.model.train()
        return self

    def eval(self) -> Backprop:
        self.model.eval()
        return self

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "fed": self.fed,
        }

    def checkpoint_state(self) -> dict:
        return self.state_dict()

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state)

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.fed = state.get("fed", 0)

