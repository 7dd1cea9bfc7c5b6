"""The threaded executor's machinery: a thread per stage, the queues between them, and the
links a stage's clock sends and receives through (the caller's side: :mod:`.threads`).

Why it agrees bitwise with the reference executor, and what makes it safe: ``docs/design.md``,
"The threaded executor".
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from ddgpipe.core.clock import Grads, run_stage_clock
from ddgpipe.core.rng import StageRngs, draws_random_numbers
from ddgpipe.core.schedule import Schedule
from ddgpipe.core.stage import LossFn, Stage
from ddgpipe.core.streams import Handoff, on_stream, receive, send
from ddgpipe.core.ties import TieWaitStopped
from ddgpipe.core.timeline import Timeline
from ddgpipe.core.values import Value, tensors
from ddgpipe.errors import StageError, UsageError
from ddgpipe.runtime.executor import tensor_of, tensors_of

__all__ = ["StageThreads"]

_POLL_S = 0.05
_END = "end of stream"


class _Stopped(Exception):
    """Raised in a stage thread waiting for a peer when the executor is stopping."""


class StageThreads:
    """Runs each of ``stages`` on a thread of its own along ``schedule``, fed by the caller.

    The caller (:class:`~ddgpipe.runtime.threads.ThreadedExecutor`) puts minibatches in and
    takes losses out; a failure in a stage thread is kept and re-raised on the caller's side.
    """

    def __init__(self, stages: list[Stage], schedule: Schedule, rng: StageRngs,
                 timeline: Timeline | None, timeout_s: float, threads: int):
        self.stages = stages
        self.schedule = schedule
        self.rng = rng
        self.timeline = timeline
        self.timeout_s = timeout_s
        self.threads = threads
        k = len(stages)
        self._acts: list[queue.Queue] = [queue.Queue() for _ in range(k)]
        self._grads: list[queue.Queue] = [queue.Queue() for _ in range(k)]
        self._targets: queue.Queue = queue.Queue()
        self._losses: queue.Queue = queue.Queue()
        self._input: list[tuple[Value, bool] | None] = [None] * k  # this clock's activation
        self.random: list[bool | None] = [None] * k  # None until the stage's first clock
        self.free_ops: list[set[str]] = [set() for _ in range(k)]  # ops seen to draw nothing
        self.done = [0] * k  # clocks each stage has completed
        self._done_changed = threading.Condition()
        self._stop = threading.Event()
        self._failure: tuple[int, BaseException] | None = None
        self._threads: list[threading.Thread] = []
        self.fed = 0  # minibatches put in so far
        self.ended = False  # the caller said no more minibatches come
        for stage in stages:  # a copy waiting for a tie's gradients stops with the rest
            if stage.ties is not None:
                stage.ties.exchange.interrupt_when(self._stop.is_set)

    # --- the caller's side ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def start(self, clock: int) -> None:
        """Start every stage thread at ``clock`` (once; again after :meth:`close`)."""
        if self._threads:
            return
        self._stop.clear()
        self.rng.start()
        for stage in self.stages:
            thread = threading.Thread(target=self._stage_main, args=(stage, clock), daemon=True,
                                      name=f"ddgpipe-stage-{stage.index}")
            self._threads.append(thread)
            thread.start()

    def put(self, minibatch: int, x: Value, y: Tensor, loss_fn: LossFn) -> None:
        """Queue a minibatch: stage 0's input, the last stage's target."""
        self._targets.put((minibatch, send(y), loss_fn))
        self._acts[0].put((minibatch, send(x), False))
        self.fed = minibatch + 1

    def end_stream(self) -> None:
        """Tell stage 0 (which tells the next) that no more minibatches come: the drain."""
        self.ended = True
        self._acts[0].put(_END)

    def next_loss(self, what: str) -> tuple[int, Handoff]:
        """The next loss the last stage computed: its minibatch and the loss."""
        return self._await(self._losses, what)

    def join(self) -> None:
        """Wait for every stage thread to end (after :meth:`end_stream`), within the timeout."""
        deadline = time.monotonic() + self.timeout_s
        for k, thread in enumerate(self._threads):
            while thread.is_alive():
                thread.join(_POLL_S)
                self.raise_failure()
                if time.monotonic() > deadline:
                    raise StageError(k, f"did not finish draining within "
                                     f"{self.timeout_s:.0f} s")
        self.raise_failure()

    def wait_done(self, finished: Callable[[list[int]], bool]) -> None:
        """Wait until ``finished(clocks each stage completed)`` holds, within the timeout."""
        self.raise_failure()
        if not self._threads:
            return
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._done_changed:
                while not finished(self.done):
                    self.raise_failure()
                    if time.monotonic() > deadline:
                        slow = self.done.index(min(self.done))
                        raise StageError(slow, f"did not finish clock {self.done[slow]} "
                                         f"within {self.timeout_s:.0f} s")
                    self._done_changed.wait(_POLL_S)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop and join every stage thread; safe to call at any time, more than once."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s)
        self._threads = []

    def request_stop(self) -> None:
        """Ask every stage thread to stop, without waiting (safe from any thread)."""
        self._stop.set()

    def raise_failure(self) -> None:
        """Re-raise, on the caller's side, what failed in a stage thread (after stopping all)."""
        if self._failure is None:
            return
        self.close()
        k, error = self._failure
        if isinstance(error, UsageError):
            raise error
        first = str(error).splitlines()[0] if str(error) else ""
        raise StageError(k, f"{type(error).__name__}: {first}") from error

    def pending_gradients(self) -> list[list]:
        """The gradients waiting for a stage's next backward, as a checkpoint keeps them."""
        grads = []
        for k, q in enumerate(self._grads):
            with q.mutex:
                grads += [[k, m, list(tensors(h.value)), scale] for m, h, scale in q.queue]
        return grads

    def resume(self, clock: int, fed: int,
               grads: list[tuple[int, int, tuple[Tensor, ...], float]]) -> None:
        """Start again from a checkpoint taken after ``clock`` clocks and ``fed`` minibatches."""
        for k, m, g, scale in grads:
            self._grads[k].put((m, Handoff(g), scale))
        self.done = [clock] * len(self.stages)
        self.fed = fed

    def _await(self, q: queue.Queue, what: str):
        """The next item of ``q`` for the caller; a failed stage or a timeout raises."""
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                self.raise_failure()
                try:
                    return q.get(timeout=_POLL_S)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise StageError(len(self.stages) - 1, f"{what} did not come within "
                                         f"{self.timeout_s:.0f} s") from None
        except BaseException:
            self.close()
            raise

    # --- a stage's thread ---------------------------------------------------------------------

    def _stage_main(self, stage: Stage, clock: int) -> None:
        k = stage.index
        try:
            torch.set_num_threads(self.threads)
            with on_stream(stage.device, stage.stream):
                self._run_stage(stage, clock)
        except (_Stopped, TieWaitStopped):
            pass
        except BaseException as error:
            if self._failure is None:
                self._failure = (k, error)
            self._stop.set()

    def _run_stage(self, stage: Stage, clock: int) -> None:
        k, total = stage.index, None
        while total is None or clock < self.schedule.clocks(total):
            actions = self.schedule.actions(k, clock, total)
            if actions and actions[0].op == "F":  # an input, or the news that none will come
                item = self._get(self._acts[k], stage, f"the activation of minibatch {clock}",
                                 due=lambda c=clock: self.fed > c or self.ended)
                if item == _END:
                    total = clock
                    if not stage.is_last:
                        self._acts[k + 1].put(_END)
                    continue
                m, handoff, overflow = item
                self._input[k] = (receive(handoff, stage.device), overflow)
            run_stage_clock(stage, actions, self, guard=self._guard, timeline=self.timeline,
                            on_loss=self._hand_loss, ends_step=self.schedule.ends_step(clock))
            if self.random[k] is None:  # its first clock ran under the lock: did it draw?
                self.random[k] = draws = draws_random_numbers(stage.module)
                stage.replays_restore_rng(draws)
            clock += 1
            with self._done_changed:
                self.done[k] = clock
                self._done_changed.notify_all()
        stage.finish()  # the drain's last clock ran: apply what the compensation holds back

    def _get(self, q: queue.Queue, stage: Stage, what: str, due=lambda: True):
        """The next item of ``q`` for ``stage``. The timeout counts only while ``due()``: a
        stage waiting for a minibatch the caller has not fed yet is not waiting for a peer."""
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                item = q.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not due():
                    deadline = time.monotonic() + self.timeout_s
                elif time.monotonic() > deadline:
                    raise StageError(stage.index, f"waited {self.timeout_s:.0f} s for {what} "
                                     "and it did not come") from None
        if self.timeline is not None:
            self.timeline.record_wait(stage.index, start, time.perf_counter())
        return item

    def _hand_loss(self, minibatch: int, loss: Tensor) -> None:
        self._losses.put((minibatch, send(loss)))

    @contextmanager
    def _own_rng(self, stage: Stage, op: str, freeable: bool):
        with self.rng.use(stage.index) as use:
            yield
        if use.drew:
            self.random[stage.index] = True
        elif freeable:
            self.free_ops[stage.index].add(op)  # it drew nothing and replayed no forward

    def _guard(self, stage: Stage, op: str):
        """The stage's rng around ``op``, under the generator lock, unless the stage draws
        nothing or ``op`` was seen to draw nothing: a dropout network's forwards hold the
        lock, their backwards and steps run beside the other stages' work. A backward that
        replays a forward (recompute, none, a minibatch restored from a checkpoint) sets the
        random state to the forward's, so it always holds the lock."""
        if self.random[stage.index] is False:
            return nullcontext()
        replays = op == "B" and stage.backward_replays()
        if op in self.free_ops[stage.index] and not replays:
            return nullcontext()
        return self._own_rng(stage, op, freeable=op != "F" and not replays)

    # --- links: queues between threads --------------------------------------------------------

    def recv_activation(self, stage: Stage, minibatch: int) -> tuple[Value, bool]:
        item, self._input[stage.index] = self._input[stage.index], None
        assert item is not None, "the stage's thread received this clock's input"
        return item

    def send_activation(self, stage: Stage, minibatch: int, out: Value, overflow: bool) -> None:
        self._acts[stage.index + 1].put((minibatch, send(out), overflow))

    def recv_gradient(self, stage: Stage, minibatch: int) -> tuple[Grads, float]:
        m, handoff, scale = self._get(self._grads[stage.index], stage,
                                      f"the gradient of minibatch {minibatch}")
        if m != minibatch:
            raise RuntimeError(f"stage {stage.index} expected the gradient of minibatch "
                               f"{minibatch} and got that of {m}")
        return tensors_of(receive(handoff, stage.device)), scale

    def send_gradient(self, stage: Stage, minibatch: int, grads: Grads,
                      loss_scale: float) -> None:
        self._grads[stage.index - 1].put((minibatch, send(grads), loss_scale))

    def target(self, stage: Stage, minibatch: int) -> tuple[Tensor, LossFn]:
        m, handoff, loss_fn = self._get(self._targets, stage, f"the target of minibatch "
                                        f"{minibatch}")
        return tensor_of(receive(handoff, stage.device)), loss_fn
