"""What every pipelined method shares: stages, an executor, and the ``step``/``drain`` API."""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Generator, Iterable

import torch
from torch import Tensor, nn

from ddgpipe.core.stage import LossFn
from ddgpipe.core.values import Value
from ddgpipe.errors import NonFiniteLossError, UsageError
from ddgpipe.runtime.executor import Executor

__all__ = ["PipelineMethod"]


class PipelineMethod:
    """A model cut into stages, run clock by clock by an executor.

    With the threaded executor the stages keep computing after :meth:`step` returns (the
    earlier stages' delayed backwards); everything that reads the weights (:meth:`eval`,
    :meth:`predict`, :meth:`state_dict`, checkpoints) first waits for them to finish the
    clocks fed so far. :meth:`close` (or ``with`` the method) stops the stage threads; it
    runs by itself when a step fails.
    """

    def __init__(self, model: nn.Module, executor: Executor, check_finite: bool = True):
        self.model = model
        self.executor = executor
        self.stages = executor.stages  # this process's
        self.check_finite = check_finite
        # A pipeline dropped without drain() or close() must not leave its stage threads
        # waiting for minibatches that will never come: they stop when it is collected.
        weakref.finalize(self, executor.request_stop)

    @property
    def num_stages(self) -> int:
        """K, the stages of the whole pipeline."""
        return self.executor.num_stages

    @property
    def split(self) -> list[int] | None:
        """The cut the stages came from (block indices)."""
        return self.executor.split

    @property
    def split_tuning(self) -> dict | None:
        """How the cut was chosen: the timed candidates, when it was timed."""
        return self.executor.split_tuning

    @property
    def devices(self) -> list[torch.device]:
        """The device of each of this process's stages."""
        return [s.device for s in self.stages]

    @property
    def executor_kind(self) -> str:
        """``reference``, ``threads`` or ``processes``."""
        return self.executor.kind

    @property
    def fed(self) -> int:
        """Minibatches fed so far."""
        return self.executor.fed

    @property
    def lr(self) -> float:
        """The learning rate the next clock uses (shared by all stages)."""
        self.executor.last_stage_idle()
        learning = [s for s in self.stages if s.has_parameters] or self.stages
        return learning[-1].lr

    def step(self, x: Tensor | None, y: Tensor | None, loss_fn: LossFn | None) -> Tensor | None:
        """One clock: feed minibatch (x, y); return its loss (from the last stage's forward).

        Under the parallel runtime the first rank needs ``x``, the last ``y`` and ``loss_fn``
        (the others may pass None), and only the last rank gets the loss back.
        """
        try:
            return self._checked(self.executor.step(x, y, loss_fn), self.executor.fed - 1)
        except BaseException:
            self.close()
            raise

    def run(self, batches: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn,
            ahead: int | None = None) -> Generator[Tensor | None, None, None]:
        """Feed every ``(x, y)`` of ``batches`` and yield each one's loss, in order.

        The same as calling :meth:`step` for each, except that the threaded executor queues
        up to ``ahead`` minibatches (default: K) before it waits for a loss, so its first
        stage never waits for the caller: with K > 2 stages the last stage's loss comes too
        late for that otherwise. It stops after the last batch without draining; leaving the
        loop early still collects the losses of what was fed.
        """
        window = (ahead or self.num_stages) if self.executor.runs_ahead else 0
        pending: deque[int] = deque()
        try:
            for x, y in batches:
                pending.append(self.executor.feed(x, y, loss_fn))
                while len(pending) > window:
                    m = pending.popleft()
                    yield self._checked(self.executor.loss(m), m)
            while pending:
                m = pending.popleft()
                yield self._checked(self.executor.loss(m), m)
        except GeneratorExit:  # the caller stopped early: its fed minibatches still ran
            for m in pending:
                self.executor.loss(m)
            raise
        except BaseException:
            self.close()
            raise

    def _checked(self, loss: Tensor | None, minibatch: int) -> Tensor | None:
        if loss is not None and self.check_finite and not math.isfinite(loss.item()):
            raise NonFiniteLossError(loss.item(), minibatch)
        return loss

    def drain(self) -> None:
        """Run the pending work so every minibatch is learned from exactly once."""
        self.executor.drain()

    def close(self) -> None:
        """Stop the executor's stage threads, if it has any (idempotent)."""
        self.executor.close()

    def __enter__(self) -> PipelineMethod:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sync(self) -> None:
        """Wait until every stage has finished the clocks fed so far."""
        self.executor.sync()

    def sum_over_replicas(self, values: list[float]) -> list[float]:
        """Each number (a count or a sum, such as an epoch's loss sum) added over the replicas
        of this rank's stage: a collective call under replicas, ``values`` unchanged without."""
        return self.executor.sum_over_replicas(values)

    def train(self):
        self.sync()
        self.model.train()
        return self

    def eval(self):
        """Evaluation mode for inference (in-flight work is kept, not drained)."""
        self.sync()
        self.model.eval()
        return self

    @torch.no_grad()
    def predict(self, x: Value | None) -> Value | None:
        """The model's output for ``x``, through the stages and their devices (in the mode
        the model is in). Under the process runtime every rank calls it; the first gives
        ``x`` and the last gets the output."""
        return self.executor.forward_only(x)

    def checkpoint_state(self) -> dict:
        """This process's whole training state between two clocks, in-flight work included."""
        return self.executor.checkpoint_state()

    def load_checkpoint_state(self, state: dict) -> None:
        self.executor.load_checkpoint_state(state)

    def state_dict(self) -> dict:
        self.sync()
        return {"stages": [s.state_dict() for s in self.stages], "fed": self.fed}

    def load_state_dict(self, state: dict) -> None:
        if len(state["stages"]) != self.num_stages:
            raise UsageError(
                f"state has {len(state['stages'])} stages but this pipeline has "
                f"{self.num_stages}; build it with stages={len(state['stages'])}"
            )
        self.sync()
        for stage, s in zip(self.stages, state["stages"]):
            stage.load_state_dict(s)
