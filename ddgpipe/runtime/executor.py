"""The interface every executor implements, so methods and the training loop call methods.

An executor runs a list of :class:`~ddgpipe.core.stage.Stage` clock by clock along the
:class:`~ddgpipe.core.schedule.Schedule` it is given. The three of this package differ only
in where the stages run (``reference``: one thread in turn; ``threads``: a thread each;
``processes``: a rank each) and agree bitwise. What is not meaningful for an executor
(stopping threads it does not have, summing over replicas it does not run) is the identity
here.
"""

from __future__ import annotations

from torch import Tensor

from ddgpipe.core.schedule import Schedule
from ddgpipe.core.stage import LossFn, Stage
from ddgpipe.core.values import Value, describe, tensors
from ddgpipe.errors import UsageError

__all__ = ["Executor", "check_feed", "check_input", "tensor_of", "tensors_of"]


def check_input(x: object) -> Value:
    """The first stage's input: a tensor or a tuple of tensors (refused otherwise)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, tuple) and x and all(isinstance(t, Tensor) for t in x):
        return x
    raise UsageError(f"x must be a tensor or a tuple of tensors (got {describe(x)}); pass the "
                     "first block's inputs as a tuple, in the order its forward takes them")


def check_feed(x: object, y: Tensor | None,
               loss_fn: LossFn | None) -> tuple[Value, Tensor, LossFn]:
    """A minibatch as an executor that runs every stage takes it: input, target, loss."""
    if y is None or loss_fn is None:
        raise ValueError("the last stage needs the target y and loss_fn")
    return check_input(x), y, loss_fn


def tensor_of(value: Value) -> Tensor:
    assert isinstance(value, Tensor), "one tensor expected"
    return value


def tensors_of(value: Value) -> tuple[Tensor, ...]:
    return tuple(tensors(value))


class Executor:
    """Runs ``stages`` (this process's share of the pipeline) clock by clock along
    ``schedule``: at each clock a stage runs ``schedule.actions(stage, clock)``, and the drain
    runs until ``schedule.clocks(fed)``.

    ``split`` is the cut the stages came from and ``split_tuning`` how it was chosen (the
    timed candidates), as :func:`ddgpipe.runtime.build.build_stages` gives them.
    """

    #: ``reference``, ``threads`` or ``processes``: the ``--executor`` name
    kind = ""
    #: whether :meth:`feed` returns before the clock has run, so a caller may feed ahead
    runs_ahead = False

    def __init__(self, stages: list[Stage], schedule: Schedule, *,
                 split: list[int] | None = None, split_tuning: dict | None = None):
        self.stages = stages
        self.schedule = schedule
        self.clock = 0  # the next clock to run
        self.fed = 0  # minibatches fed so far
        self.split = split
        self.split_tuning = split_tuning
        self._ready: dict[int, Tensor | None] = {}  # losses fed but not taken (synchronous)

    @property
    def num_stages(self) -> int:
        """K, the stages of the whole pipeline (not only this process's)."""
        return len(self.stages)

    # --- training --------------------------------------------------------------------------

    def step(self, x: Value | None, y: Tensor | None, loss_fn: LossFn | None) -> Tensor | None:
        """One clock with a new minibatch; its loss (None where this process has no loss)."""
        raise NotImplementedError

    def feed(self, x: Value | None, y: Tensor | None, loss_fn: LossFn | None) -> int:
        """Hand over one minibatch; its number, whose loss :meth:`loss` returns. A synchronous
        executor runs the clock here; one that :attr:`runs_ahead` returns at once."""
        loss = self.step(x, y, loss_fn)
        self._ready[self.fed - 1] = loss
        return self.fed - 1

    def loss(self, minibatch: int) -> Tensor | None:
        """The loss of a fed ``minibatch`` (the oldest not taken yet)."""
        return self._ready.pop(minibatch)

    def drain(self) -> None:
        """Run the pending backwards and steps, no new forwards: training ends."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait until every stage of this process has finished the clocks fed so far."""

    def last_stage_idle(self) -> None:
        """Wait until the last stage has finished the clocks fed so far (its lr is current)."""

    def close(self) -> None:
        """Stop whatever runs in the background; safe at any time, more than once."""

    def request_stop(self) -> None:
        """Ask the background work to stop without waiting (safe from any thread)."""

    # --- what spans processes ----------------------------------------------------------------

    def sum_over_replicas(self, values: list[float]) -> list[float]:
        """Each number summed over the replicas of this process's stage (collective there)."""
        return values

    def barrier(self) -> None:
        """Return when every process of the run got here (at once in one process)."""

    def gather(self, value: object) -> list:
        """``value`` from every process of the run, in rank order (collective under
        processes; ``[value]`` in one process)."""
        return [value]

    def gather_pipeline(self, value: object) -> list:
        """``value`` from every stage of this process's pipeline (its replica), in stage
        order (collective under processes; ``[value]`` in one process)."""
        return [value]

    # --- inference and checkpoints -----------------------------------------------------------

    def forward_only(self, x: Value | None) -> Value | None:
        """Inference of one batch through every stage (eval mode is the caller's choice)."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict:
        """This process's whole state between two clocks, in-flight work included."""
        raise NotImplementedError

    def _check_checkpoints(self) -> None:
        if not self.schedule.checkpoints:
            raise NotImplementedError(f"checkpoints support ddg and bp, not "
                                      f"{self.schedule.name}")

    def load_checkpoint_state(self, state: dict) -> None:
        raise NotImplementedError
