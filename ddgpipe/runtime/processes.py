"""The process runtime: one stage per process, talking point-to-point over torch.distributed.

With R replicas (data parallelism) there are K x R processes: each replica is its own chain of
K stages, and the R copies of a stage average their gradients between B and S (see
:mod:`ddgpipe.runtime.layout` for which rank holds what, :mod:`ddgpipe.runtime.replicas` for the average).

Each rank runs its stage through :func:`ddgpipe.core.clock.run_stage_clock`, the very code the
in-process executors run, so after N clocks the weights agree bitwise with the reference
(given the same seed, one thread per worker and deterministic kernels). Only communication
is added:

* activations go k -> k+1 as a small header (shape, dtype, fp16 overflow report) then the
  payload; the header receive is posted a clock ahead, so a stage never waits to *start* a
  receive;
* gradients go k+1 -> k; their shape is the activation's, so their receives are posted as
  soon as the activation is sent, long before the delayed backward needs them; under fp16 a
  one-number message with the loss scale follows each gradient;
* every send is non-blocking (``isend``; gloo's ``send`` would block until the peer posts its
  receive), so communication overlaps computation;
* activations, gradients and evaluation batches travel in process groups of their own. Gloo
  serialises the traffic of one pair of ranks: a stage's activation send stalled behind the
  gradient its neighbour was sending it (18 ms for 8 MB on 2 busy cores), on the critical
  path. NCCL ignores tags, so the evaluation traffic needs its own group too.

Where tensors travel: with the nccl backend, on the stage's GPU. With gloo (CPU, or
``--comm host`` when several ranks share a GPU, which nccl refuses) they go through host
memory: a GPU stage copies its output to the host before sending, and what arrives to its
GPU after receiving.

A peer that dies closes its sockets and the pending receives here fail at once; every wait
also has a timeout, so a dead or hung peer ends the run with an error, never a hang.

Under replicas, each rank passes the whole global minibatch to :meth:`ProcessExecutor.step`
and the executor keeps its replica's shard; the loss it returns is the mean over the replicas
(the whole minibatch's), and :meth:`~ProcessExecutor.sync` makes the replicas' BatchNorm
running statistics agree. Both are collective: every rank calls them.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ddgpipe.core.clock import run_stage_clock
from ddgpipe.core.schedule import ACTIONS, num_clocks
from ddgpipe.core.stage import LossFn, Stage
from ddgpipe.core.timeline import Timeline
from ddgpipe.errors import PeerError
from ddgpipe.runtime.executor import Executor
from ddgpipe.runtime.layout import Layout
from ddgpipe.runtime.replicas import GradientAverager, average_buffers, broadcast_module, sum_over
from ddgpipe.runtime.wire import END_OF_STREAM, HEADER_LEN, TAGS, make_header, read_header

__all__ = ["ProcessExecutor"]


_GROUPS: dict[int, tuple[object, dict[str, dist.ProcessGroup]]] = {}


def _groups(comm: str) -> dict[str, dist.ProcessGroup]:
    """Groups for activations, gradients and evaluation, made once per default group and
    ``comm`` (creating a group is a collective call: every rank makes the same ones)."""
    world = dist.group.WORLD
    key = (id(world), comm)
    cached = _GROUPS.get(key)
    if cached is None or cached[0] is not world:
        ranks = list(range(dist.get_world_size()))
        backend = "gloo" if comm == "host" else None
        cached = (world, {name: dist.new_group(ranks, backend=backend)
                          for name in ("act", "grad", "eval")})
        _GROUPS[key] = cached
    return cached[1]


class _Done:
    """A receive that already completed (restored from a checkpoint)."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class ProcessExecutor(Executor):
    """Runs this rank's ``stage`` clock by clock, like the reference.

    ``layout`` says which stage of which replica this rank is, and who its peers are
    (default: one pipeline, rank k = stage k). ``comm`` is ``auto`` (the process group's
    backend: nccl moves GPU tensors directly, gloo moves host tensors) or ``host`` (gloo
    through host memory whatever the device).
    """

    kind = "processes"

    def __init__(
        self,
        stage: Stage,
        method: str = "ddg",
        timeline: Timeline | None = None,
        timeout_s: float = 300.0,
        comm: str = "auto",
        layout: Layout | None = None,
    ):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; use torchrun or the launcher")
        super().__init__([stage], method)
        self.stage = stage
        self.rank = dist.get_rank()
        self.layout = layout or Layout.grid(dist.get_world_size(), 1, self.rank)
        if (stage.index, stage.num_stages) != (self.layout.stage, self.layout.stages) or \
                self.layout.world != dist.get_world_size():
            raise RuntimeError(f"{self.layout.describe()} of {dist.get_world_size()} ranks got "
                               f"stage {stage.index} of {stage.num_stages}")
        self.prev, self.next = self.layout.prev_rank, self.layout.next_rank
        self.actions_at = ACTIONS[method]
        self.timeline = timeline
        self.timeout = timedelta(seconds=timeout_s)
        if stage.device.type == "cuda":  # nccl and the object collectives use this device
            torch.cuda.set_device(stage.device)
        self._groups = _groups(comm)
        backend = dist.get_backend(self._groups["act"])
        self.wire = stage.device if backend == "nccl" else torch.device("cpu")
        self._fp16 = stage.precision == "fp16"
        self._sends: list[tuple[dist.Work, Tensor]] = []
        self._grad_recvs: dict[int, tuple[dist.Work, Tensor, dist.Work | None, Tensor | None]] = {}
        self._header: tuple[dist.Work, Tensor] | None = None
        self._stream_ended = False
        self._feed: tuple[Tensor | None, Tensor | None, LossFn | None] = (None, None, None)
        self._data_group = self.layout.data_group  # None with one replica
        self._loss_sum: tuple[dist.Work, Tensor] | None = None
        if self._data_group is not None:  # replicas start from replica 0's weights
            broadcast_module(stage.module, self._data_group,
                             self.layout.rank_of(stage.index, replica=0), self.wire)
        if self._data_group is not None and stage.has_parameters:
            record = (lambda a, b: timeline.record_wait(stage.index, a, b)) if timeline else None
            stage.averager = GradientAverager(
                stage.stash.params, self._data_group, self.layout.replicas, wire=self.wire,
                timeout_s=timeout_s, describe=self.layout.describe(), record_wait=record)
        if not stage.is_first:
            self._post_header()

    @property
    def num_stages(self) -> int:
        return self.layout.stages

    # --- communication ------------------------------------------------------------------------

    def _wait(self, work: dist.Work, what: str) -> None:
        start = time.perf_counter()
        try:
            work.wait(self.timeout)
        except Exception as e:  # gloo raises RuntimeError subclasses with long C++ text
            raise PeerError(f"rank {self.rank}: {what} failed: {str(e).splitlines()[0]}") from e
        finally:
            if self.timeline is not None:
                self.timeline.record_wait(self.stage.index, start, time.perf_counter())

    def _isend(self, tensor: Tensor, dst: int, tag: int, group: str) -> None:
        tensor = tensor.to(self.wire).contiguous()
        self._sends.append((dist.isend(tensor, dst, group=self._groups[group], tag=tag), tensor))

    def _irecv(self, tensor: Tensor, src: int, tag: int, group: str) -> dist.Work:
        return dist.irecv(tensor, src, group=self._groups[group], tag=tag)

    def _reap_sends(self, wait: bool = False) -> None:
        pending = []
        for work, tensor in self._sends:
            if wait:
                self._wait(work, "send")
            elif not work.is_completed():
                pending.append((work, tensor))
        self._sends = pending

    def _post_header(self, tag: int = TAGS["act_header"]) -> None:
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.wire)
        self._header = (self._irecv(header, self.prev, tag, "act"), header)

    def _end_stream(self) -> None:
        """Tell the next stage no more forwards come, so its posted header receive completes."""
        if self._stream_ended:
            return
        self._stream_ended = True
        if not self.stage.is_first:
            work, header = self._header
            self._wait(work, f"waiting for the end of the stream from rank {self.prev}")
            assert int(header[0]) == END_OF_STREAM, "activation arrived after the stream ended"
            self._header = None
        if not self.stage.is_last:
            self._isend(make_header(None), self.next, TAGS["act_header"], "act")

    def _post_grad_recv(self, minibatch: int, shape, dtype) -> None:
        grad = torch.empty(shape, dtype=dtype, device=self.wire)
        work = self._irecv(grad, self.next, TAGS["grad"], "grad")
        scale_work = scale = None
        if self._fp16:
            scale = torch.empty(1, dtype=torch.float64, device=self.wire)
            scale_work = self._irecv(scale, self.next, TAGS["scale"], "grad")
        self._grad_recvs[minibatch] = (work, grad, scale_work, scale)

    # --- links --------------------------------------------------------------------------------

    def recv_activation(self, stage: Stage, minibatch: int) -> tuple[Tensor, bool]:
        if stage.is_first:
            return self._feed[0].to(stage.device, non_blocking=True), False
        work, header = self._header
        self._wait(work, f"receiving an activation header from rank {self.prev}")
        ndim, shape, dtype, overflow = read_header(header)
        if ndim == END_OF_STREAM:
            raise RuntimeError("the previous stage ended its stream before this forward")
        self._post_header()
        buf = torch.empty(shape, dtype=dtype, device=self.wire)
        self._wait(self._irecv(buf, self.prev, TAGS["act"], "act"),
                   f"receiving an activation from rank {self.prev}")
        return buf.to(stage.device, non_blocking=True), overflow

    def send_activation(self, stage: Stage, minibatch: int, out: Tensor, overflow: bool) -> None:
        self._isend(make_header(out, overflow), self.next, TAGS["act_header"], "act")
        self._isend(out, self.next, TAGS["act"], "act")
        # Whatever op consumes it (DDG's B, DNI's G), the gradient of this output will come.
        self._post_grad_recv(minibatch, out.shape, out.dtype)

    def recv_gradient(self, stage: Stage, minibatch: int) -> tuple[Tensor, float]:
        work, grad, scale_work, scale = self._grad_recvs.pop(minibatch)
        what = f"receiving the gradient of minibatch {minibatch} from rank {self.next}"
        self._wait(work, what)
        loss_scale = 1.0
        if scale_work is not None:
            self._wait(scale_work, what)
            loss_scale = float(scale.item())
        return grad.to(stage.device, non_blocking=True), loss_scale

    def send_gradient(self, stage: Stage, minibatch: int, grad: Tensor, loss_scale: float) -> None:
        self._isend(grad, self.prev, TAGS["grad"], "grad")
        if self._fp16:
            self._isend(torch.tensor([loss_scale], dtype=torch.float64), self.prev,
                        TAGS["scale"], "grad")

    def target(self, stage: Stage, minibatch: int) -> tuple[Tensor, LossFn]:
        _, y, loss_fn = self._feed
        return y.to(stage.device, non_blocking=True), loss_fn

    # --- checkpoints ----------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        """This rank's share of a consistent cut between clock ``clock - 1`` and ``clock``.

        Only gradients cross a clock boundary (an activation is consumed in the clock it is
        sent): the one this stage needs at the next clock was sent by stage k+1 during the
        clock just finished, so it is awaited and saved; later ones do not exist yet.

        ``shared`` is the stage's state every replica holds alike (weights, optimizer,
        schedule), given by replica 0 only (None elsewhere): a checkpoint keeps one copy per
        stage. The rest (in-flight minibatches, gradients on the way) is this rank's own.
        """
        if self.method != "ddg":
            raise NotImplementedError("checkpoints support ddg and bp, not dni")
        self.sync()  # the replicas' BatchNorm statistics agree before one copy is kept
        grads = []
        nxt = self.clock - self.stage.delay  # the minibatch the next clock's backward takes
        if not self.stage.is_last and nxt in self._grad_recvs:
            grad, scale = self.recv_gradient(self.stage, nxt)
            self._grad_recvs[nxt] = self._received(grad, scale)  # not waited on twice
            grads.append([self.stage.index, nxt, grad.clone(), scale])
        shared = self.stage.state_dict() if self.layout.writes_stage_state else None
        return {"clock": self.clock, "fed": self.fed, "grads": grads,
                "stage_index": self.stage.index, "shared": shared,
                "inflight": self.stage.inflight_state()}

    def load_checkpoint_state(self, state: dict) -> None:
        """Resume from :meth:`checkpoint_state`, with ``shared`` filled in from the stage's
        copy (written by replica 0)."""
        if "shared" in state:
            self.stage.load_state_dict(state["shared"])
            self.stage.load_inflight_state(state["inflight"])
        else:  # format 3: one pipeline, each rank's file held its whole stage
            self.stage.load_pipeline_state(state["stage"])
        self.clock, self.fed = state["clock"], state["fed"]
        saved = {m: (g, scale) for _, m, g, scale in state["grads"]}
        if self.stage.is_last:
            return
        for pending in self.stage.inflight:
            m = pending.minibatch
            if m in saved:
                self._grad_recvs[m] = self._received(*saved[m])
            else:
                self._post_grad_recv(m, pending.output_shape, pending.output_dtype)

    def _received(self, grad: Tensor, scale: float):
        """A gradient receive that has already completed, as :meth:`recv_gradient` reads it."""
        meta = (_Done(), torch.tensor([scale], dtype=torch.float64)) if self._fp16 else \
            (None, None)
        return (_Done(), grad.to(self.wire), *meta)

    # --- clocks -------------------------------------------------------------------------------

    def step(self, x: Tensor | None, y: Tensor | None, loss_fn: LossFn | None) -> Tensor | None:
        """One clock with a new minibatch; the last stage returns its loss, the others None.

        Under replicas every rank may pass the whole global minibatch: the first stage of
        replica r keeps shard r of ``x``, the last stage shard r of ``y``, and the loss
        returned is the mean over the replicas' shards.
        """
        if self._stream_ended:
            raise RuntimeError("this pipeline was drained; build a new one to go on training")
        if self.stage.is_first and x is None:
            raise ValueError("the first stage needs the input x")
        if self.stage.is_last and (y is None or loss_fn is None):
            raise ValueError("the last stage needs the target y and loss_fn")
        x = self.layout.shard(x) if self.stage.is_first else None
        y = self.layout.shard(y) if self.stage.is_last else None
        self._feed = (x, y, loss_fn)
        loss = self._run_clock(None)
        self._feed = (None, None, None)
        self.fed += 1
        return loss

    def drain(self) -> None:
        """Run the pending backwards and steps, then wait for every send to be delivered."""
        self._end_stream()
        while self.clock < num_clocks(self.num_stages, self.fed, self.method):
            self._run_clock(self.fed)
        self._reap_sends(wait=True)

    def sync(self) -> None:
        """Every call here runs to the end of its clock; under replicas, make the replicas'
        BatchNorm running statistics agree (their mean), a collective call."""
        if self._data_group is not None:
            average_buffers(self.stage.module, self._data_group, self.layout.replicas,
                            self.wire)

    def sum_over_replicas(self, values: list[float]) -> list[float]:
        """``values`` summed over this stage's replicas (collective; as is with one)."""
        if self._data_group is None:
            return values
        return sum_over(values, self._data_group)

    def barrier(self) -> None:
        dist.barrier()

    def max_over_ranks(self, value: float) -> float:
        everyone: list[float | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, value)
        return max(v for v in everyone if v is not None)

    def _run_clock(self, total) -> Tensor | None:
        actions = self.actions_at(self.stage.index, self.num_stages, self.clock, total)
        on_loss = self._start_loss_mean if self._data_group is not None else None
        loss = run_stage_clock(self.stage, actions, self, timeline=self.timeline,
                               on_loss=on_loss)
        if loss is not None and on_loss is not None:
            loss = self._loss_mean(loss)
        self._reap_sends()
        self.clock += 1
        return loss

    def _start_loss_mean(self, minibatch: int, loss: Tensor) -> None:
        """Start summing the replicas' losses while this clock's backward runs."""
        total = loss.detach().to(self.wire, torch.float64).reshape(1)
        work = dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self._data_group,
                               async_op=True)
        self._loss_sum = (work, total)

    def _loss_mean(self, loss: Tensor) -> Tensor:
        work, total = self._loss_sum
        self._loss_sum = None
        self._wait(work, "averaging the loss with the other replicas")
        return (total / self.layout.replicas).to(loss.device, loss.dtype).reshape(())

    # --- evaluation through the stages ----------------------------------------------------------

    @torch.no_grad()
    def forward_only(self, x: Tensor | None) -> Tensor | None:
        """Inference of one batch through the ranks of one pipeline; its last rank returns the
        output. Under replicas the last replica answers (the one whose last rank reports; the
        weights are every replica's, BatchNorm statistics once :meth:`sync` ran) and the
        other replicas return None at once."""
        stage, layout = self.stage, self.layout
        if layout.replica != layout.replicas - 1:
            return None
        if stage.is_first:
            inp = x.to(stage.device)
        else:
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.wire)
            self._wait(self._irecv(header, self.prev, TAGS["eval_header"], "eval"),
                       "receiving an evaluation header")
            _, shape, dtype, _ = read_header(header)
            buf = torch.empty(shape, dtype=dtype, device=self.wire)
            self._wait(self._irecv(buf, self.prev, TAGS["eval"], "eval"),
                       "receiving an evaluation activation")
            inp = buf.to(stage.device)
        with stage._autocast():
            out = stage.module(inp)
        if stage.is_last:
            return out
        group = self._groups["eval"]
        for tensor, tag in ((make_header(out), TAGS["eval_header"]), (out, TAGS["eval"])):
            tensor = tensor.to(self.wire).contiguous()
            self._wait(dist.isend(tensor, self.next, group=group, tag=tag), "sending eval")
        return None
