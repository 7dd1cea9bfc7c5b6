"""One rank's point-to-point channel to its neighbours in the pipeline: non-blocking sends,
receives posted ahead, a timeout on every wait (why it is built this way: ``docs/design.md``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ddgpipe.core.values import Value, tensors
from ddgpipe.errors import PeerError
from ddgpipe.runtime.wire import (
    HEADER_LEN,
    TAGS,
    Header,
    Spec,
    from_wire,
    make_header,
    read_header,
    to_wire,
)

__all__ = ["Channel", "GradientReceipt", "process_groups"]

_GROUPS: dict[tuple[int, str], tuple[object, dict[str, dist.ProcessGroup]]] = {}


def process_groups(comm: str) -> dict[str, dist.ProcessGroup]:
    """Groups for activations, gradients and evaluation, made once per default group and
    ``comm`` (creating a group is a collective call: every rank makes the same ones). Gloo
    serialises one pair's traffic, so each kind of message has a group of its own."""
    world = dist.group.WORLD
    key = (id(world), comm)
    cached = _GROUPS.get(key)
    if cached is None or cached[0] is not world:
        ranks = list(range(dist.get_world_size()))
        backend = "gloo" if comm == "host" else None
        made = {name: dist.new_group(ranks, backend=backend) for name in ("act", "grad", "eval")}
        cached = (world, made)
        _GROUPS[key] = cached
    return cached[1]


class _Done:
    """A receive that already completed (restored from a checkpoint)."""

    def wait(self, timeout: Any = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


@dataclass
class GradientReceipt:
    """The receives posted for one minibatch's gradients (and its fp16 loss scale)."""

    works: list[Any]
    grads: list[Tensor]
    scale: tuple[Any, Tensor] | None = None


@dataclass
class Channel:
    """Messages between this rank and its neighbours ``prev``/``next`` (None at the ends)."""

    rank: int
    prev: int | None
    next: int | None
    groups: dict[str, dist.ProcessGroup]
    wire: torch.device  # where tensors travel: the GPU under nccl, else the host
    timeout: timedelta
    fp16: bool = False
    record_wait: Callable[[float, float], None] | None = None
    sends: list[tuple[Any, Tensor]] = field(default_factory=list)

    def wait(self, work: Any, what: str) -> None:
        start = time.perf_counter()
        try:
            work.wait(self.timeout)
        except Exception as e:  # gloo raises RuntimeError subclasses with long C++ text
            raise PeerError(f"rank {self.rank}: {what} failed: {str(e).splitlines()[0]}") from e
        finally:
            if self.record_wait is not None:
                self.record_wait(start, time.perf_counter())

    def isend(self, tensor: Tensor, dst: int | None, tag: str, group: str) -> None:
        assert dst is not None, "a send has a peer"
        tensor = to_wire(tensor, self.wire)
        work = dist.isend(tensor, dst, group=self.groups[group], tag=TAGS[tag])
        self.sends.append((work, tensor))

    def irecv(self, tensor: Tensor, src: int | None, tag: str, group: str) -> Any:
        assert src is not None, "a receive has a peer"
        return dist.irecv(tensor, src, group=self.groups[group], tag=TAGS[tag])

    def reap_sends(self, wait: bool = False) -> None:
        """Forget the sends that completed (all of them, waiting, with ``wait``)."""
        pending = []
        for work, tensor in self.sends:
            if wait:
                self.wait(work, "send")
            elif not work.is_completed():
                pending.append((work, tensor))
        self.sends = pending

    # --- activations -------------------------------------------------------------------------

    def post_header(self, tag: str = "act_header", group: str = "act") -> tuple[Any, Tensor]:
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.wire)
        return self.irecv(header, self.prev, tag, group), header

    def send_value(self, value: Value | None, overflow: bool = False, *, tags=("act_header", "act"),
                   group: str = "act") -> None:
        """A header, then every tensor of ``value`` (None: the end of the stream)."""
        self.isend(make_header(value, overflow), self.next, tags[0], group)
        for t in tensors(value) if value is not None else []:
            self.isend(t, self.next, tags[1], group)

    def recv_value(self, posted: tuple[Any, Tensor], device: torch.device, *, tag: str = "act",
                   group: str = "act") -> tuple[Value | None, Header]:
        """The value whose header receive was ``posted``, on ``device``, marked for gradients
        as the sender marked it (None when the stream ended)."""
        work, header = posted
        self.wait(work, f"receiving a header from rank {self.prev}")
        head = read_header(header)
        if head.ended:
            return None, head
        parts = []
        for spec in head.specs:
            buf, received = from_wire(spec, self.wire)
            self.wait(self.irecv(buf, self.prev, tag, group),
                      f"receiving an activation from rank {self.prev}")
            parts.append(received.to(device, non_blocking=True).requires_grad_(spec.marked))
        return (tuple(parts) if head.is_tuple else parts[0]), head

    # --- gradients ---------------------------------------------------------------------------

    def post_gradients(self, specs: list[Spec] | list[tuple[tuple[int, ...], torch.dtype]]
                       ) -> GradientReceipt:
        """Receives for the gradients of the marked outputs (``(shape, dtype)`` each)."""
        shapes = [(s.shape, s.dtype) if isinstance(s, Spec) else s for s in specs]
        grads = [torch.empty(shape, dtype=dtype, device=self.wire) for shape, dtype in shapes]
        works = [self.irecv(g, self.next, "grad", "grad") for g in grads]
        scale = None
        if self.fp16:
            buf = torch.empty(1, dtype=torch.float64, device=self.wire)
            scale = (self.irecv(buf, self.next, "scale", "grad"), buf)
        return GradientReceipt(works, grads, scale)

    def received(self, grads: tuple[Tensor, ...], scale: float) -> GradientReceipt:
        """A receipt that has already completed, as :meth:`await_gradients` reads it."""
        done = (_Done(), torch.tensor([scale], dtype=torch.float64)) if self.fp16 else None
        return GradientReceipt([_Done() for _ in grads], [g.to(self.wire) for g in grads], done)

    def await_gradients(self, receipt: GradientReceipt, device: torch.device,
                        what: str) -> tuple[tuple[Tensor, ...], float]:
        for work in receipt.works:
            self.wait(work, what)
        loss_scale = 1.0
        if receipt.scale is not None:
            self.wait(receipt.scale[0], what)
            loss_scale = float(receipt.scale[1].item())
        return tuple(g.to(device, non_blocking=True) for g in receipt.grads), loss_scale

    def send_gradients(self, grads: tuple[Tensor, ...], loss_scale: float) -> None:
        for g in grads:
            self.isend(g, self.prev, "grad", "grad")
        if self.fp16:
            self.isend(torch.tensor([loss_scale], dtype=torch.float64), self.prev, "scale",
                       "grad")
