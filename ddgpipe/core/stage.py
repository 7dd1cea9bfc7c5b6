"""One pipeline stage: a slice of the network, its optimizer, LR schedule and weight stash.

A stage computes on tensors and knows nothing of processes or threads: every executor (the
reference, the threaded one, the process runtime) calls the very same methods, which is why
they agree bitwise. A stage owns its device (its module lives there) and, on a GPU, a CUDA
stream of its own; the executors move tensors between stages, never the stage.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from ddgpipe.core.compensation import Compensation
from ddgpipe.core.gradient_sum import GradientSum
from ddgpipe.core.precision import LossScaler, autocast, check_precision, unscale_
from ddgpipe.core.stash import Pending, Stash, updates_unseen
from ddgpipe.core.streams import new_stream
from ddgpipe.core.ties import StageTies, TieExchange, TieGroup, check_even
from ddgpipe.core.values import Value, describe, handed_on, tensors
from ddgpipe.errors import UsageError

__all__ = ["Stage", "StageFactory", "GradientAverager", "OptimizerFactory", "SchedulerFactory",
           "LossFn", "check_clip"]

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], LRScheduler]
LossFn = Callable[[Any, Tensor], Tensor]  # (the last stage's output, the target) -> loss


class GradientAverager(Protocol):
    """Averages a stage's gradients over its replicas between B and S
    (:class:`ddgpipe.runtime.replicas.GradientAverager` is the one the process runtime sets)."""

    def watching(self, leaves: dict[str, Tensor]) -> AbstractContextManager:
        """Around the backward that writes into ``leaves``: start averaging as they fill."""
        ...

    def wait(self) -> None:
        """Wait for the averages and write them into the gradients."""
        ...


class Stage:
    """Stage ``index`` of ``num_stages``; its backward lags its forward by ``delay`` clocks.

    ``grad_shrink`` (beta) scales the delayed gradient by ``beta ** delay`` before the step,
    the gradient shrinking of the authors' follow-up FDG; 1.0 is the paper's DDG.
    ``compile`` runs the stage's forward and backward through ``torch.compile``
    (:mod:`ddgpipe.core.compiled`). ``clip_grad`` clips the global norm of *this stage's*
    gradient before the step: the
    stages learn from different minibatches, so a norm across stages would mean nothing;
    with one stage it is backprop's global clip.
    ``precision`` is ``fp32``, ``bf16`` or ``fp16`` (see :mod:`ddgpipe.core.precision`).
    ``microbatches`` M is how many clocks feed one optimizer step (microbatched DDG): the
    backwards between two steps are summed and the step applies their mean; a gradient is
    then at most ``stale_steps`` = ceil(delay / M) steps stale.
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
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        clip_grad: float | None = None,
        compile: bool = False,
        microbatches: int = 1,
    ):
        self.index = index
        self.num_stages = num_stages
        self.delay = num_stages - 1 - index if delay is None else delay
        self.stale_steps = -(-self.delay // microbatches)  # what the compensations count
        self.gradient_sum = GradientSum()  # the backwards since the last step
        self.device = torch.device(device)
        self.precision = check_precision(precision)
        self.module = module.to(self.device)
        self.stream = new_stream(self.device)
        params = [p for p in module.parameters() if p.requires_grad]
        self._factories = (optimizer, lr_scheduler)  # the tied copies' get their own too
        self._build_optimizer(params)
        self.stash = Stash(module, stash, self.delay, needs_input_grad=index > 0,
                           device=self.device, compute_context=self.autocast,
                           compile=compile)
        self.stash.shares_snapshots = not updates_unseen(self.optimizer)
        self.grad_scale = grad_shrink**self.delay
        self.clip_grad = check_clip(clip_grad)
        self.inflight: deque[Pending] = deque()
        self.steps = 0
        self.compensation = compensation if compensation and params else Compensation()
        self.compensation.bind(self)
        self._forward_weights: dict[str, Tensor] | None = None  # of the minibatch B just ran
        # fp16 loss scaling (see ddgpipe.core.precision): the last stage owns the scale; every
        # stage skips a step whose gradients overflowed and reports it forward.
        self.loss_scaler = LossScaler() if precision == "fp16" and self.is_last else None
        self.grad_loss_scale = 1.0  # the scale the input gradient just returned carries
        self.overflow_skips = 0
        self._skip_step = False
        self._overflow = False  # an overflow seen here or reported from before, not sent on
        # Set by an executor running R > 1 replicas of this stage (see ddgpipe.runtime.replicas): it
        # averages the gradients over the replicas between B and S.
        self.averager: GradientAverager | None = None
        # Its copies of parameters tied to other stages (set by the executor's build, see
        # ddgpipe.core.ties): stepped apart from the stage's optimizer, every clock.
        self.ties: StageTies | None = None

    def _build_optimizer(self, params: list[nn.Parameter]) -> None:
        # A stage without trainable parameters (a pooling head, say) only passes gradients on.
        optimizer, lr_scheduler = self._factories
        self.optimizer = optimizer(params) if params else None
        self.lr_scheduler = lr_scheduler(self.optimizer) \
            if lr_scheduler and self.optimizer is not None else None

    def bind_ties(self, groups: list[TieGroup], exchange: TieExchange) -> None:
        """Hold this stage's copies of the tied ``groups`` apart: the stage's optimizer
        keeps the other parameters, each copy gets an optimizer and LR schedule of its own
        (the same factories), stepped through ``exchange`` at the end of every clock."""
        mine = [g for g in groups if self.index in g.stages]
        if not mine:
            return
        check_even(mine[0], self.compensation.name, self.grad_scale, self.delay, self.precision)
        ties = StageTies(self.index, mine, self.stash.params, *self._factories,
                         clip_grad=self.clip_grad, exchange=exchange)
        tied = {id(p) for p in ties.params}
        self._build_optimizer([p for p in self.stash.params.values() if id(p) not in tied])
        self.stash.shares_snapshots = not any(updates_unseen(o) for o in
                                              [self.optimizer, *ties.optimizers])
        self.compensation.bind(self)
        self.ties = ties

    def offer_ties(self) -> None:
        """After a clock's actions: hand the tied copies' gradients of this clock on."""
        if self.ties is not None:
            self.ties.offer()

    def autocast(self):
        """The context every computation of this stage runs in (autocast at its precision)."""
        return autocast(self.precision, self.device)

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by name, as the stash and the compensations see them."""
        return self.stash.params

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def _forward(self, minibatch: int, x: Value) -> tuple[Value, Pending]:
        weights = self.compensation.forward_weights() if self.delay > 0 else None
        try:
            return self.stash.forward(minibatch, x, weights)
        except RuntimeError as e:  # shape/dtype mismatches surface as RuntimeError in torch
            if self.is_first or "shape" in str(e) or "size" in str(e):
                given = f"an input of shape {tuple(x.shape)}" if isinstance(x, Tensor) \
                    else f"an input of {describe(x)}"
                raise UsageError(
                    f"stage {self.index} cannot take {given} "
                    f"({str(e).splitlines()[0]}); check the data against the model's "
                    "expected input"
                ) from None
            raise

    def forward(self, minibatch: int, x: Value, overflow: bool = False) -> Value:
        """F: run minibatch ``minibatch`` with the current weights; return the activation,
        detached, each tensor marked with whether its gradient will come back.

        ``overflow`` is the fp16 overflow report that came with ``x`` (see :meth:`take_overflow`).
        """
        self._overflow |= overflow
        out, pending = self._forward(minibatch, x)
        sent = handed_on(out, floating=self.stash.mode in ("recompute", "none"))
        pending.output_marks = [t.requires_grad for t in tensors(sent)]
        pending.grad_shapes = [(tuple(t.shape), t.dtype) for t in tensors(sent)
                               if t.requires_grad]
        self.inflight.append(pending)
        return sent

    def forward_loss(self, minibatch: int, x: Value, y: Tensor, loss_fn: LossFn,
                     overflow: bool = False) -> Tensor:
        """F of the last stage: the forward and the loss, kept for this clock's backward."""
        self._overflow |= overflow
        out, pending = self._forward(minibatch, x)
        with self.autocast():
            loss = loss_fn(out, y)
        if loss.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar (got shape {tuple(loss.shape)}); "
                "reduce it, e.g. F.cross_entropy(out, y) with reduction='mean'"
            )
        pending.output = loss
        if self.loss_scaler is not None:
            pending.loss_scale = self.loss_scaler.scale
        self.inflight.append(pending)
        return loss.detach()

    def take_overflow(self) -> bool:
        """The overflow report to send on with this clock's activation (and forget it)."""
        report, self._overflow = self._overflow, False
        return report

    def backward(self, minibatch: int, grad_output: tuple[Tensor, ...] | None = None,
                 loss_scale: float = 1.0) -> tuple[Tensor, ...] | None:
        """B: backpropagate minibatch ``minibatch`` through its stashed weights.

        ``grad_output`` holds the gradients of the loss w.r.t. this stage's marked outputs
        (None for the last stage, whose output is the loss), scaled by ``loss_scale`` under
        fp16. Returns the gradients w.r.t. the marked inputs, or None for the first stage;
        they carry the same scale, :attr:`grad_loss_scale`.
        """
        if not self.inflight or self.inflight[0].minibatch != minibatch:
            oldest = self.inflight[0].minibatch if self.inflight else None
            raise RuntimeError(
                f"stage {self.index}: backward of minibatch {minibatch} but the oldest "
                f"in-flight minibatch is {oldest}"
            )
        pending = self.inflight.popleft()
        replayed = self.delay > 0 and self.stash.mode == "none"
        if replayed:  # None replays at the live weights; a compensation may estimate older ones
            pending.weights = self.compensation.replay_weights()
        output = self.stash.output_for_backward(pending)
        grads: tuple[Tensor, ...] | Tensor | None = grad_output
        if self.is_last:
            loss_scale = pending.loss_scale
            assert isinstance(output, Tensor), "the last stage's output is the loss"
            # fp16: d(scale * loss) / d(loss); fp32: the loss's own gradient
            grads = torch.full_like(output, loss_scale) if self.precision == "fp16" else None
        if self.averager is None:
            grad_in = self.stash.backward(pending, output, grads)
        else:  # each bucket's average starts as soon as the backward has produced it
            with self.averager.watching(self.stash.grad_leaves(pending)):
                grad_in = self.stash.backward(pending, output, grads)
        self.gradient_sum.add(self.stash.params)
        self._forward_weights = None if replayed else pending.weights
        self.grad_loss_scale = loss_scale
        return grad_in

    def learn(self, minibatch: int, true_grad: tuple[Tensor, ...]) -> None:
        """G: a DNI stage's gradient-model update; DDG's stages learn in B and S."""
        raise NotImplementedError(f"{type(self).__name__} has no op G")

    def _finish_gradients(self) -> None:
        """What turns the backward's gradients into the one the step applies, in S so that it
        sees the replicas' average: fp16 unscaling (an overflow in any replica is in the
        average, so every replica skips alike), the stage's clipping, FDG's shrinking."""
        if self.averager is not None:
            self.averager.wait()
        if self.precision == "fp16":
            grads = [p.grad for p in self.stash.params.values() if p.grad is not None]
            self._skip_step = unscale_(grads, self.grad_loss_scale)
            self._overflow |= self._skip_step
        if self.clip_grad is not None and not self._skip_step:
            torch.nn.utils.clip_grad_norm_(list(self.stash.params.values()), self.clip_grad)
        if self.grad_scale != 1.0:
            for p in self.stash.params.values():
                if p.grad is not None:
                    p.grad.mul_(self.grad_scale)

    def step(self, minibatch: int) -> None:
        """S: apply the gradient of minibatch ``minibatch`` (through the compensation); under
        microbatches the mean of the gradients summed since the last step. The tied copies'
        gradients wait for the clock's end."""
        self.gradient_sum.apply(self.stash.params)
        if self.ties is not None:
            self.ties.take()
        self._finish_gradients()
        if self._skip_step:  # fp16 overflow: skip, as GradScaler does
            self._skip_step = False
            self.overflow_skips += 1
        elif self.optimizer is None:
            pass
        elif self.delay > 0:
            self.compensation.step(self._forward_weights)
        else:
            self.optimizer.step()
        self._forward_weights = None
        self.steps += 1

    def finish(self) -> None:
        """At the end of training, after the drain's last clock: the compensation applies
        what it still holds back (``accumulate``'s leftover gradients). A stage without delay
        never consults its compensation, nor does this."""
        if self.delay > 0 and self.optimizer is not None:
            self.compensation.finish()

    def end_clock(self, ends_step: bool = True) -> None:
        """Advance the LR schedule where the clock ``ends_step`` (every clock unless several
        feed one step): every stage advances alike, so all share lr_t.

        The last stage also updates the fp16 loss scale from this clock's overflow reports;
        first, the tied copies step with the sum of their uses' gradients of the clock.
        """
        if self.ties is not None:
            self.ties.settle()
            if ends_step:  # the copies' schedules advance with the stage's own
                self.ties.advance_lr()
        if self.loss_scaler is not None:
            self.loss_scaler.update(self.take_overflow())
        if self.lr_scheduler is None or not ends_step:
            return
        with warnings.catch_warnings():
            # During warm-up a stage has not stepped yet; the schedule must still advance.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.lr_scheduler.step()

    @property
    def has_parameters(self) -> bool:
        return self.optimizer is not None or self.ties is not None

    @property
    def lr(self) -> float:
        """The learning rate of the next clock (NaN for a stage without parameters)."""
        optimizer = self.optimizer or (self.ties.optimizers[0] if self.ties else None)
        if optimizer is None:
            return float("nan")
        return float(optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        state = {
            "module": self._module_state(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "steps": self.steps,
            "compensation": self.compensation.state_dict(),
        }
        if self.ties is not None:  # a tie is checkpointed once, by its owner
            state["ties"] = self.ties.owned_state()
        if self.precision == "fp16":
            state["fp16"] = {"overflow": self._overflow, "skips": self.overflow_skips,
                             "scaler": self.loss_scaler.state_dict() if self.loss_scaler
                             else None}
        if self.gradient_sum.count:  # a checkpoint between two clocks of one step
            state["gradient_sum"] = self.gradient_sum.state_dict()
        return state

    def pipeline_state(self) -> dict:
        """``state_dict`` plus the in-flight minibatches: everything to resume mid-pipeline."""
        return self.state_dict() | {"inflight": self.inflight_state()}

    def load_pipeline_state(self, state: dict) -> None:
        self.load_state_dict(state)
        self.load_inflight_state(state["inflight"])

    def replays_restore_rng(self, draws: bool) -> None:
        """Whether a replayed forward restores the random state of its forward: only worth it
        when the stage ``draws`` random numbers (an executor learns that at its first clock)."""
        self.stash.restores_rng = draws

    def backward_replays(self) -> bool:
        """Whether the next backward replays a forward, restoring its random state: always
        under stash recompute and none, and for a minibatch restored from a checkpoint."""
        return self.stash.mode in ("recompute", "none") or bool(
            self.inflight and self.inflight[0].output is None)

    def inflight_state(self) -> list[dict]:
        """The in-flight minibatches as plain tensors: what differs between the replicas of a
        stage (their inputs are different shards), unlike :meth:`state_dict`."""
        return [self.stash.export(p) for p in self.inflight]

    def load_inflight_state(self, records: list[dict]) -> None:
        self.inflight = deque(self.stash.restore(r) for r in records)

    def _module_state(self) -> dict:
        copied = self.ties.copied_names() if self.ties is not None else set()
        return {n: t for n, t in self.module.state_dict().items() if n not in copied}

    def load_state_dict(self, state: dict) -> None:
        copied = self.ties.copied_names() if self.ties is not None else set()
        missing, unexpected = self.module.load_state_dict(state["module"], strict=not copied)
        if set(missing) - copied or unexpected:
            raise RuntimeError(f"stage {self.index}: the saved weights do not fit the stage "
                               f"(missing {sorted(set(missing) - copied)}, unexpected "
                               f"{sorted(unexpected)})")
        if self.ties is not None:  # the copies take the owner's weights and states
            self.ties.restore(state.get("ties", {}))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.steps = state.get("steps", 0)
        self.compensation.load_state_dict(state.get("compensation", {}))
        self.gradient_sum.load_state_dict(state.get("gradient_sum", {}), self.device)
        fp16 = state.get("fp16")
        if fp16 is not None:
            self._overflow, self.overflow_skips = fp16["overflow"], fp16["skips"]
            if self.loss_scaler is not None:
                self.loss_scaler.load_state_dict(fp16["scaler"])


StageFactory = Callable[[int, int, nn.Module, torch.device], Stage]
"""``(index, num_stages, module, device) -> Stage``: how a method builds its stages."""


def check_clip(clip_grad: float | None) -> float | None:
    """A gradient-norm bound: None (no clipping) or a positive number."""
    if clip_grad is not None and not clip_grad > 0:
        raise UsageError(f"the gradient clip must be a positive norm (got {clip_grad}); "
                         "leave it out not to clip")
    return clip_grad
