"""The parallel runtime: one stage per process, talking point-to-point over torch.distributed.

Each rank runs the very ``Stage`` methods the reference executor runs, in the order of the
same schedule, so after N clocks the weights agree bitwise with ``local.py`` (given the same
seed, one thread per worker and deterministic kernels). Only communication is added:

* activations go k -> k+1 as a small header (shape) then the payload; the header receive is
  posted a clock ahead, so a stage never waits to *start* a receive;
* gradients go k+1 -> k; their shape is the activation's, so their receives are posted as
  soon as the activation is sent, long before the delayed backward needs them;
* every send is non-blocking (``isend``; gloo's ``send`` would block until the peer posts its
  receive), so communication overlaps computation;
* activations and gradients travel in two process groups of their own. Gloo serialises the
  traffic of one pair of ranks: a stage's activation send stalled behind the gradient its
  neighbour was sending it (18 ms for 8 MB on 2 busy cores), on the critical path of the
  schedule. Two groups give each direction its own connection.

A peer that dies closes its sockets and the pending receives here fail at once; every wait
also has a timeout, so a dead or hung peer ends the run with an error, never a hang.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ddgpipe.schedule import ddg_actions, dni_actions, num_clocks
from ddgpipe.stage import LossFn, Stage
from ddgpipe.timeline import Timeline

__all__ = ["DistributedExecutor", "PeerError", "TAGS"]

TAGS = {"act_header": 1, "act": 2, "grad": 3, "eval_header": 4, "eval": 5}
HEADER_LEN = 8  # ndim, then up to 7 sizes
END_OF_STREAM = -1  # a header with this ndim says no more forwards will come


class PeerError(RuntimeError):
    """A neighbour stage failed, died or timed out."""


_DIRECTION_GROUPS: dict[int, tuple[object, dist.ProcessGroup, dist.ProcessGroup]] = {}


def _direction_groups() -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(activations group, gradients group), made once per default group (a collective call)."""
    world = dist.group.WORLD
    cached = _DIRECTION_GROUPS.get(id(world))
    if cached is None or cached[0] is not world:
        ranks = list(range(dist.get_world_size()))
        cached = (world, dist.new_group(ranks), dist.new_group(ranks))
        _DIRECTION_GROUPS[id(world)] = cached
    return cached[1], cached[2]


class _Done:
    """A receive that already completed (restored from a checkpoint)."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class DistributedExecutor:
    """Runs this rank's ``stage`` (rank k = stage k) clock by clock, like ``LocalExecutor``."""

    def __init__(
        self,
        stage: Stage,
        method: str = "ddg",
        timeline: Timeline | None = None,
        timeout_s: float = 300.0,
    ):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; use torchrun or the launcher")
        self.stage = stage
        self.stages = [stage]
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        if stage.index != self.rank or stage.num_stages != self.world:
            raise RuntimeError(
                f"rank {self.rank} of {self.world} got stage {stage.index} of {stage.num_stages}"
            )
        self.method = method
        self.actions_at = {"ddg": ddg_actions, "dni": dni_actions}[method]
        self.timeline = timeline
        self.timeout = timedelta(seconds=timeout_s)
        self.clock = 0
        self.fed = 0
        self._sends: list[tuple[dist.Work, Tensor]] = []
        self._grad_recvs: dict[int, tuple[dist.Work, Tensor]] = {}
        self._header: tuple[dist.Work, Tensor] | None = None
        self._stream_ended = False
        self._act_group, self._grad_group = _direction_groups()
        if not stage.is_first:
            self._post_header()

    @property
    def num_stages(self) -> int:
        return self.world

    # --- communication ------------------------------------------------------------------------

    def _wait(self, work: dist.Work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as e:  # gloo raises RuntimeError subclasses with long C++ text
            raise PeerError(f"rank {self.rank}: {what} failed: {str(e).splitlines()[0]}") from e

    def _group(self, tag: int) -> dist.ProcessGroup:
        return self._grad_group if tag == TAGS["grad"] else self._act_group

    def _isend(self, tensor: Tensor, dst: int, tag: int) -> None:
        tensor = tensor.contiguous()
        self._sends.append((dist.isend(tensor, dst, group=self._group(tag), tag=tag), tensor))

    def _irecv(self, tensor: Tensor, src: int, tag: int) -> dist.Work:
        return dist.irecv(tensor, src, group=self._group(tag), tag=tag)

    def _reap_sends(self, wait: bool = False) -> None:
        pending = []
        for work, tensor in self._sends:
            if wait:
                self._wait(work, "send")
            elif not work.is_completed():
                pending.append((work, tensor))
        self._sends = pending

    def _post_header(self, tag: int = TAGS["act_header"]) -> None:
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        self._header = (self._irecv(header, self.rank - 1, tag), header)

    @staticmethod
    def _make_header(shape: torch.Size | None) -> Tensor:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        if shape is None:
            header[0] = END_OF_STREAM
        else:
            if len(shape) >= HEADER_LEN:
                raise ValueError(f"activations of {len(shape)} dimensions are not supported")
            header[0] = len(shape)
            header[1 : 1 + len(shape)] = torch.tensor(shape)
        return header

    def _recv_activation(self) -> Tensor | None:
        work, header = self._header
        self._wait(work, f"receiving an activation header from rank {self.rank - 1}")
        ndim = int(header[0])
        if ndim == END_OF_STREAM:
            self._header = None
            return None
        self._post_header()
        buf = torch.empty(tuple(header[1 : 1 + ndim].tolist()))
        self._wait(self._irecv(buf, self.rank - 1, TAGS["act"]),
                   f"receiving an activation from rank {self.rank - 1}")
        return buf

    def _send_activation(self, minibatch: int, out: Tensor) -> None:
        self._isend(self._make_header(out.shape), self.rank + 1, TAGS["act_header"])
        self._isend(out, self.rank + 1, TAGS["act"])
        # Whatever op consumes it (DDG's B, DNI's G), the gradient of this output will come.
        grad = torch.empty_like(out)
        self._grad_recvs[minibatch] = (self._irecv(grad, self.rank + 1, TAGS["grad"]), grad)

    def _recv_grad(self, minibatch: int) -> Tensor:
        work, grad = self._grad_recvs.pop(minibatch)
        self._wait(work, f"receiving the gradient of minibatch {minibatch} from rank "
                         f"{self.rank + 1}")
        return grad

    def _end_stream(self) -> None:
        """Tell the next stage no more forwards come, so its posted header receive completes."""
        if self._stream_ended:
            return
        self._stream_ended = True
        if not self.stage.is_first:
            work, header = self._header
            self._wait(work, f"waiting for the end of the stream from rank {self.rank - 1}")
            assert int(header[0]) == END_OF_STREAM, "activation arrived after the stream ended"
            self._header = None
        if not self.stage.is_last:
            self._isend(self._make_header(None), self.rank + 1, TAGS["act_header"])

    # --- checkpoints ----------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        """This rank's share of a consistent cut between clock ``clock - 1`` and ``clock``.

        Only gradients cross a clock boundary (an activation is consumed in the clock it is
        sent): the one this stage needs at the next clock was sent by stage k+1 during the
        clock just finished, so it is awaited and saved; later ones do not exist yet.
        """
        if self.method != "ddg":
            raise NotImplementedError("checkpoints support ddg and bp, not dni")
        grads = []
        nxt = self.clock - self.stage.delay  # the minibatch the next clock's backward takes
        if not self.stage.is_last and nxt in self._grad_recvs:
            work, grad = self._grad_recvs[nxt]
            self._wait(work, f"receiving the gradient of minibatch {nxt} for a checkpoint")
            self._grad_recvs[nxt] = (_Done(), grad)  # gloo must not be waited on twice
            grads.append([nxt, grad.clone()])
        return {"clock": self.clock, "fed": self.fed, "grads": grads,
                "stage": self.stage.pipeline_state()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.stage.load_pipeline_state(state["stage"])
        self.clock, self.fed = state["clock"], state["fed"]
        saved = {m: g for m, g in state["grads"]}
        if self.stage.is_last:
            return
        for pending in self.stage.inflight:
            m = pending.minibatch
            if m in saved:
                self._grad_recvs[m] = (_Done(), saved[m])
            else:
                grad = torch.empty(pending.output_shape)
                self._grad_recvs[m] = (self._irecv(grad, self.rank + 1, TAGS["grad"]), grad)

    # --- clocks -------------------------------------------------------------------------------

    def step(self, x: Tensor | None, y: Tensor | None, loss_fn: LossFn | None) -> Tensor | None:
        """One clock with a new minibatch; the last rank returns its loss, the others None."""
        if self._stream_ended:
            raise RuntimeError("this pipeline was drained; build a new one to go on training")
        if self.stage.is_first and x is None:
            raise ValueError("the first stage needs the input x")
        if self.stage.is_last and (y is None or loss_fn is None):
            raise ValueError("the last stage needs the target y and loss_fn")
        loss = self._run_clock(None, x, y, loss_fn)
        self.fed += 1
        return loss

    def drain(self) -> None:
        """Run the pending backwards and steps, then wait for every send to be delivered."""
        self._end_stream()
        while self.clock < num_clocks(self.world, self.fed, self.method):
            self._run_clock(self.fed, None, None, None)
        self._reap_sends(wait=True)

    def _run_clock(self, total, x, y, loss_fn) -> Tensor | None:
        stage, loss = self.stage, None
        for action in self.actions_at(stage.index, self.world, self.clock, total):
            start = time.perf_counter()
            m = action.minibatch
            if action.op == "F":
                activation = x if stage.is_first else self._recv_activation()
                if stage.is_last:
                    loss = stage.forward_loss(m, activation, y, loss_fn)
                else:
                    self._send_activation(m, stage.forward(m, activation))
            elif action.op == "B":
                grad = None
                if stage.gradient_op == "B" and not stage.is_last:
                    grad = self._recv_grad(m)
                grad_in = stage.backward(m, grad)
                if not stage.is_first:
                    self._isend(grad_in, self.rank - 1, TAGS["grad"])
            elif action.op == "S":
                stage.step(m)
            elif action.op == "G":
                stage.learn(m, self._recv_grad(m))
            if self.timeline is not None:
                self.timeline.record(action, start, time.perf_counter())
        stage.end_clock()
        self._reap_sends()
        self.clock += 1
        return loss

    # --- evaluation through the stages ----------------------------------------------------------

    @torch.no_grad()
    def forward_only(self, x: Tensor | None) -> Tensor | None:
        """Inference of one batch through all ranks; the last rank returns the output."""
        module = self.stage.module
        if self.stage.is_first:
            out = module(x)
        else:
            header = torch.empty(HEADER_LEN, dtype=torch.int64)
            self._wait(self._irecv(header, self.rank - 1, TAGS["eval_header"]),
                       "receiving an evaluation header")
            buf = torch.empty(tuple(header[1 : 1 + int(header[0])].tolist()))
            self._wait(self._irecv(buf, self.rank - 1, TAGS["eval"]),
                       "receiving an evaluation activation")
            out = module(buf)
        if self.stage.is_last:
            return out
        header = self._make_header(out.shape)
        group = self._act_group
        self._wait(dist.isend(header, self.rank + 1, group=group, tag=TAGS["eval_header"]),
                   "sending eval")
        self._wait(dist.isend(out.contiguous(), self.rank + 1, group=group, tag=TAGS["eval"]),
                   "sending eval")
        return None
