"""Plain backpropagation: the baseline, and the reference DDG with K = 1 must equal bitwise."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from ddgpipe.core.compiled import CompiledForward
from ddgpipe.core.precision import autocast, check_precision
from ddgpipe.core.stage import LossFn, OptimizerFactory, SchedulerFactory, check_clip
from ddgpipe.core.values import Blocks, Value, as_args, map_tensors
from ddgpipe.errors import NonFiniteLossError
from ddgpipe.methods.traced import backprop_forward
from ddgpipe.runtime.devices import resolve_device
from ddgpipe.runtime.executor import check_input

__all__ = ["Backprop"]


class Backprop:
    """``zero_grad; forward; loss; backward; step; scheduler.step`` once per call to ``step``.

    ``device`` holds the model (inputs and targets are moved there); ``precision`` ``bf16``
    or ``fp16`` runs the forward under autocast, fp16 with ``torch.amp.GradScaler``;
    ``clip_grad`` clips the gradients' global norm before every step; ``compile`` runs the
    training forward through ``torch.compile`` as DDG's stages do (inference stays eager).
    Any ``nn.Module`` runs as it is (one stage: nothing to trace); a HuggingFace causal LM
    runs without its cache and gives ``loss_fn`` its logits, as DDG's traced blocks do.
    """

    num_stages = 1
    executor_kind = "reference"
    split: list[int] | None = None  # one stage: no cut
    split_tuning: dict | None = None

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        *,
        lr_scheduler: SchedulerFactory | None = None,
        clip_grad: float | None = None,
        check_finite: bool = True,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        compile: bool = False,
    ):
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)
        self.precision = check_precision(precision)
        self.model = model.to(self.device)
        self._blocks: nn.Module = Blocks(OrderedDict(model._modules)) \
            if isinstance(model, nn.Sequential) else backprop_forward(model)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer(self._params)
        self.clip_grad = check_clip(clip_grad)
        self.lr_scheduler: LRScheduler | None = \
            lr_scheduler(self.optimizer) if lr_scheduler else None
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.check_finite = check_finite
        self.compiled = CompiledForward(self._blocks) if compile else None
        self.fed = 0

    def step(self, x: Value, y: Tensor, loss_fn: LossFn) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        x = map_tensors(check_input(x), lambda t: t.to(self.device, non_blocking=True))
        y = y.to(self.device, non_blocking=True)
        with autocast(self.precision, self.device):
            loss = loss_fn(self._train_forward(x), y)
        if self.check_finite and not math.isfinite(loss.item()):
            raise NonFiniteLossError(loss.item(), self.fed)
        if self.scaler is None:
            loss.backward()
            self._clip()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            if self.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)  # clip what the step will apply
                self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.fed += 1
        return loss.detach()

    def _forward(self, x: Value) -> Value:
        """The model on ``x``; an ``nn.Sequential`` runs as DDG runs its blocks (a tuple
        passed on as positional arguments, every output checked)."""
        return self._blocks(*as_args(x))

    def _train_forward(self, x: Value) -> Value:
        if self.compiled is None:
            return self._forward(x)
        out, _ = self.compiled(dict(self._blocks.named_parameters()), as_args(x))
        return out

    def _clip(self) -> None:
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad)

    def run(self, batches, loss_fn: LossFn):
        """:meth:`step` on every ``(x, y)`` of ``batches``, yielding the losses."""
        for x, y in batches:
            yield self.step(x, y, loss_fn)

    def drain(self) -> None:
        """Nothing is in flight in backprop."""

    def sync(self) -> None:
        """Nothing runs in the background."""

    def close(self) -> None:
        """Nothing to stop."""

    def sum_over_replicas(self, values: list[float]) -> list[float]:
        """One process, one replica: ``values`` as they are."""
        return values

    @torch.no_grad()
    def predict(self, x: Value) -> Value:
        """The model's output for ``x`` (in the mode the model is in)."""
        with autocast(self.precision, self.device):
            return self._forward(map_tensors(check_input(x), lambda t: t.to(self.device)))

    @property
    def devices(self) -> list[torch.device]:
        """Where the one stage, the whole model, computes."""
        return [self.device]

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
            "scaler": self.scaler.state_dict() if self.scaler else None,
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
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.fed = state.get("fed", 0)
