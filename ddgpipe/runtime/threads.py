"""The threaded executor: one process, one thread per stage, queues between them.

This module is the caller's side (feed, losses, drain, checkpoints); the stage threads, their
queues and links are :mod:`ddgpipe.runtime.stage_threads`. Why it agrees bitwise with the
reference executor, and what makes it safe: ``docs/design.md``, "The threaded executor".
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ddgpipe.core.schedule import Schedule
from ddgpipe.core.stage import LossFn, Stage
from ddgpipe.core.timeline import Timeline
from ddgpipe.core.values import Value
from ddgpipe.runtime.devices import cores_per_stage
from ddgpipe.runtime.executor import check_feed, tensor_of
from ddgpipe.runtime.in_process import InProcessExecutor
from ddgpipe.runtime.stage_threads import StageThreads

__all__ = ["ThreadedExecutor"]


class ThreadedExecutor(InProcessExecutor):
    """Runs ``stages`` on one thread each, along ``schedule``."""

    kind = "threads"
    runs_ahead = True

    def __init__(self, stages: list[Stage], schedule: Schedule,
                 timeline: Timeline | None = None, timeout_s: float = 300.0,
                 threads: int | None = None, *, split: list[int] | None = None,
                 split_tuning: dict | None = None):
        # clock: the next one every stage runs when all are idle
        super().__init__(stages, schedule, split=split, split_tuning=split_tuning)
        self.timeline = timeline
        self.timeout_s = timeout_s
        self.threads = threads or cores_per_stage(len(stages))
        self.workers = StageThreads(stages, schedule, self.rng, timeline, timeout_s,
                                    self.threads)
        self._warned_generator = False

    # --- the caller's side ------------------------------------------------------------------

    def step(self, x: Value | None, y: Tensor | None, loss_fn: LossFn | None) -> Tensor:
        """Feed one minibatch; return its loss as soon as the last stage has computed it.

        The stages go on with the clock's backwards meanwhile; the next ``step`` can feed the
        next minibatch before they are done. With K > 2, :meth:`run` keeps the first stage
        busier: it feeds minibatches ahead of the losses it returns.
        """
        m = self.feed(x, y, loss_fn)
        return self.loss(m)

    def feed(self, x: Value | None, y: Tensor | None, loss_fn: LossFn | None) -> int:
        """Queue one minibatch without waiting; returns its number (see :meth:`loss`)."""
        x, y, loss_fn = check_feed(x, y, loss_fn)
        self.workers.raise_failure()
        if self.workers.ended:
            raise RuntimeError("this pipeline was drained; drain() ends training, so build a "
                               "new DDG to go on (evaluation needs no drain)")
        self.workers.start(self.clock)
        self._watch_caller_generator()
        m = self.fed
        self.workers.put(m, x, y, loss_fn)
        self.fed += 1
        return m

    def loss(self, minibatch: int) -> Tensor:
        """The loss of the oldest fed minibatch whose loss was not taken yet: ``minibatch``."""
        got, handoff = self.workers.next_loss(f"the loss of minibatch {minibatch}")
        assert got == minibatch, f"loss of minibatch {got} arrived for {minibatch}"
        loss = tensor_of(handoff.value)
        if handoff.event is not None:  # the caller may read it at once, on any stream
            handoff.event.synchronize()
            loss.record_stream(torch.cuda.current_stream(loss.device))
        return loss

    def _watch_caller_generator(self) -> None:
        """Warn once when the caller drew from torch's global generator while stages that
        draw random numbers ran: the draws interleave with theirs (seen by the stage rngs'
        swaps, which find the generator moved between two of them)."""
        if self._warned_generator or not any(self.workers.random) or \
                not self.rng.check_caller():
            return  # (when no stage draws, nothing interleaves: compiling may draw, harmlessly)
        self._warned_generator = True
        warnings.warn(
            "the caller drew from torch's global random generator while the stage threads "
            "ran (between two minibatches fed to the threaded executor); stages that draw "
            "random numbers swap their own streams into that generator, so the caller's "
            "draws and theirs interleave and the numbers differ from the reference "
            "executor's and from run to run: give the data pipeline a torch.Generator of "
            "its own, or call pipe.sync() before drawing", RuntimeWarning, stacklevel=4)

    def last_stage_idle(self) -> None:
        """Wait until the last stage has finished every clock fed so far (its LR is current)."""
        self.workers.wait_done(lambda done: done[-1] >= self.fed)

    def drain(self) -> None:
        """Run the pending backwards and steps, then stop the stage threads."""
        self.workers.raise_failure()
        if self.workers.ended:
            return
        self.workers.start(self.clock)
        self.workers.end_stream()
        try:
            self.workers.join()
        finally:
            self.close()
        self._synchronize_devices()
        self.clock = self.schedule.clocks(self.fed)

    def sync(self) -> None:
        """Wait until every stage has finished every clock fed so far (then all are idle)."""
        self.workers.wait_done(lambda done: min(done) >= self.fed)
        self._synchronize_devices()
        self.clock = self.fed
        self.rng.idle()

    def close(self) -> None:
        """Stop and join every stage thread; safe to call at any time, more than once."""
        self.workers.close()

    def request_stop(self) -> None:
        """Ask every stage thread to stop, without waiting (safe from any thread)."""
        self.workers.request_stop()

    def __del__(self) -> None:
        self.workers.request_stop()

    def checkpoint_state(self) -> dict:
        """Between two clocks (all stages idle): the reference executor's checkpoint."""
        self._check_checkpoints()
        self.sync()
        return self._state(self.workers.pending_gradients())

    def load_checkpoint_state(self, state: dict) -> None:
        if self.workers.running:
            raise RuntimeError("load a checkpoint before the first step")
        grads = self._load_state(state)
        self.workers.resume(self.clock, self.fed, grads)

    @torch.no_grad()
    def forward_only(self, x: Value | None) -> Value | None:
        self.sync()
        return super().forward_only(x)

    def _synchronize_devices(self) -> None:
        for stage in self.stages:
            if stage.stream is not None:
                stage.stream.synchronize()
