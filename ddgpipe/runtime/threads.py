"""The threaded executor: one process, one thread per stage, queues between them.

Why it agrees bitwise with the reference executor, and what makes it safe: ``docs/design.md``,
"The threaded executor".
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from ddgpipe.core.clock import Grads, run_stage_clock
from ddgpipe.core.rng import draws_random_numbers
from ddgpipe.core.schedule import ACTIONS, num_clocks
from ddgpipe.core.stage import LossFn, Stage
from ddgpipe.core.streams import Handoff, on_stream, receive, send
from ddgpipe.core.timeline import Timeline
from ddgpipe.core.values import Value, tensors
from ddgpipe.errors import StageError, UsageError
from ddgpipe.runtime.devices import cores_per_stage
from ddgpipe.runtime.executor import check_feed, tensor_of, tensors_of
from ddgpipe.runtime.in_process import InProcessExecutor

__all__ = ["ThreadedExecutor"]

_POLL_S = 0.05
_END = "end of stream"


class _Stopped(Exception):
    """Raised in a stage thread waiting for a peer when the executor is stopping."""


class ThreadedExecutor(InProcessExecutor):
    """Runs ``stages`` on one thread each, following the schedule of ``method`` (ddg or dni)."""

    kind = "threads"
    runs_ahead = True

    def __init__(self, stages: list[Stage], method: str = "ddg",
                 timeline: Timeline | None = None, timeout_s: float = 300.0,
                 threads: int | None = None):
        super().__init__(stages, method)  # clock: the next one every stage runs when all idle
        self.actions_at = ACTIONS[method]
        self.timeline = timeline
        self.timeout_s = timeout_s
        self.threads = threads or cores_per_stage(len(stages))
        k = len(stages)
        self._acts: list[queue.Queue] = [queue.Queue() for _ in range(k)]
        self._grads: list[queue.Queue] = [queue.Queue() for _ in range(k)]
        self._targets: queue.Queue = queue.Queue()
        self._losses: queue.Queue = queue.Queue()
        self._input: list[tuple[Value, bool] | None] = [None] * k  # this clock's activation
        self._random: list[bool | None] = [None] * k  # None until the stage's first clock
        self._free_ops: list[set[str]] = [set() for _ in range(k)]  # ops seen to draw nothing
        self._done = [0] * k  # clocks each stage has completed
        self._done_changed = threading.Condition()
        self._stop = threading.Event()
        self._failure: tuple[int, BaseException] | None = None
        self._threads: list[threading.Thread] = []
        self._ended = False  # drain() was called: no more minibatches
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
        self._raise_failure()
        if self._ended:
            raise RuntimeError("this pipeline was drained; drain() ends training, so build a "
                               "new DDG to go on (evaluation needs no drain)")
        self._start()
        self._watch_caller_generator()
        m = self.fed
        self._targets.put((m, send(y), loss_fn))
        self._acts[0].put((m, send(x), False))
        self.fed += 1
        return m

    def loss(self, minibatch: int) -> Tensor:
        """The loss of the oldest fed minibatch whose loss was not taken yet: ``minibatch``."""
        got, handoff = self._await(self._losses, f"the loss of minibatch {minibatch}")
        assert got == minibatch, f"loss of minibatch {got} arrived for {minibatch}"
        loss = tensor_of(handoff.value)
        if handoff.event is not None:  # the caller may read it at once, on any stream
            handoff.event.synchronize()
            loss.record_stream(torch.cuda.current_stream(loss.device))
        return loss

    def _watch_caller_generator(self) -> None:
        """Warn once when the caller drew from torch's global generator while stages that
        draw random numbers ran: the draws interleave with theirs (seen by the stage streams'
        swaps, which find the generator moved between two of them)."""
        if self._warned_generator or not any(self._random) or not self.streams.check_caller():
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
        self._wait_done(lambda done: done[-1] >= self.fed)

    def drain(self) -> None:
        """Run the pending backwards and steps, then stop the stage threads."""
        self._raise_failure()
        if self._ended:
            return
        self._ended = True
        self._start()
        self._acts[0].put(_END)
        deadline = time.monotonic() + self.timeout_s
        try:
            for k, thread in enumerate(self._threads):
                while thread.is_alive():
                    thread.join(_POLL_S)
                    self._raise_failure()
                    if time.monotonic() > deadline:
                        raise StageError(k, f"did not finish draining within "
                                         f"{self.timeout_s:.0f} s")
            self._raise_failure()
        finally:
            self.close()
        self._synchronize_devices()
        self.clock = num_clocks(self.num_stages, self.fed, self.method)

    def sync(self) -> None:
        """Wait until every stage has finished every clock fed so far (then all are idle)."""
        self._wait_done(lambda done: min(done) >= self.fed)
        self._synchronize_devices()
        self.clock = self.fed
        self.streams.idle()

    def _wait_done(self, finished) -> None:
        self._raise_failure()
        if not self._threads:
            return
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._done_changed:
                while not finished(self._done):
                    self._raise_failure()
                    if time.monotonic() > deadline:
                        slow = self._done.index(min(self._done))
                        raise StageError(slow, f"did not finish clock {self._done[slow]} "
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

    def __del__(self) -> None:
        self._stop.set()

    def checkpoint_state(self) -> dict:
        """Between two clocks (all stages idle): the reference executor's checkpoint."""
        self._check_ddg()
        self.sync()
        grads = []
        for k, q in enumerate(self._grads):
            with q.mutex:
                grads += [[k, m, list(tensors(h.value)), scale] for m, h, scale in q.queue]
        return self._state(grads)

    def load_checkpoint_state(self, state: dict) -> None:
        if self._threads:
            raise RuntimeError("load a checkpoint before the first step")
        for k, m, g, scale in self._load_state(state):
            self._grads[k].put((m, Handoff(g), scale))
        self._done = [self.clock] * self.num_stages

    @torch.no_grad()
    def forward_only(self, x: Value | None) -> Value | None:
        self.sync()
        return super().forward_only(x)

    def _start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        self.streams.start()
        for stage in self.stages:
            thread = threading.Thread(target=self._stage_main, args=(stage,), daemon=True,
                                      name=f"ddgpipe-stage-{stage.index}")
            self._threads.append(thread)
            thread.start()

    def _await(self, q: queue.Queue, what: str):
        """The next item of ``q`` for the caller; a failed stage or a timeout raises."""
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                self._raise_failure()
                try:
                    return q.get(timeout=_POLL_S)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise StageError(self.num_stages - 1, f"{what} did not come within "
                                         f"{self.timeout_s:.0f} s") from None
        except BaseException:
            self.close()
            raise

    def _raise_failure(self) -> None:
        if self._failure is None:
            return
        self.close()
        k, error = self._failure
        if isinstance(error, UsageError):
            raise error
        first = str(error).splitlines()[0] if str(error) else ""
        raise StageError(k, f"{type(error).__name__}: {first}") from error

    def _synchronize_devices(self) -> None:
        for stage in self.stages:
            if stage.stream is not None:
                stage.stream.synchronize()

    # --- a stage's thread ---------------------------------------------------------------------

    def _stage_main(self, stage: Stage) -> None:
        k = stage.index
        try:
            torch.set_num_threads(self.threads)
            with on_stream(stage.device, stage.stream):
                self._run_stage(stage)
        except _Stopped:
            pass
        except BaseException as error:
            if self._failure is None:
                self._failure = (k, error)
            self._stop.set()

    def _run_stage(self, stage: Stage) -> None:
        k, clock, total = stage.index, self.clock, None
        while total is None or clock < num_clocks(self.num_stages, total, self.method):
            actions = self.actions_at(k, self.num_stages, clock, total)
            if actions and actions[0].op == "F":  # an input, or the news that none will come
                item = self._get(self._acts[k], stage, f"the activation of minibatch {clock}",
                                 due=lambda c=clock: self.fed > c or self._ended)
                if item == _END:
                    total = clock
                    if not stage.is_last:
                        self._acts[k + 1].put(_END)
                    continue
                m, handoff, overflow = item
                self._input[k] = (receive(handoff, stage.device), overflow)
            run_stage_clock(stage, actions, self, guard=self._guard, timeline=self.timeline,
                            on_loss=self._hand_loss)
            if self._random[k] is None:  # its first clock ran under the lock: did it draw?
                self._random[k] = draws = draws_random_numbers(stage.module)
                stage.stash.restores_rng = draws
            clock += 1
            with self._done_changed:
                self._done[k] = clock
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
    def _random_stream(self, stage: Stage, op: str, freeable: bool):
        with self.streams.use(stage.index) as use:
            yield
        if use.drew:
            self._random[stage.index] = True
        elif freeable:
            self._free_ops[stage.index].add(op)  # it drew nothing and replayed no forward

    def _guard(self, stage: Stage, op: str):
        """The stage's random stream around ``op``, under the generator lock, unless the stage
        draws nothing or ``op`` was seen to draw nothing: a dropout network's forwards hold
        the lock, their backwards and steps run beside the other stages' work. A backward
        that replays a forward (recompute, none, a minibatch restored from a checkpoint) sets
        the random state to the forward's, so it always holds the lock."""
        if self._random[stage.index] is False:
            return nullcontext()
        replays = op == "B" and stage.backward_replays()
        if op in self._free_ops[stage.index] and not replays:
            return nullcontext()
        return self._random_stream(stage, op, freeable=op != "F" and not replays)

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
