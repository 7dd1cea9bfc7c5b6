"""The process runtime's links: how one rank's stage gets its input, target and gradients and
hands on its output and input gradients, over its :class:`~ddgpipe.runtime.p2p.Channel`
(the caller's side: :mod:`ddgpipe.runtime.processes`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ddgpipe.core.clock import Grads
from ddgpipe.core.stage import LossFn, Stage
from ddgpipe.core.values import Value, map_tensors
from ddgpipe.runtime.layout import Layout
from ddgpipe.runtime.p2p import Channel, GradientReceipt

__all__ = ["RankLinks"]


class RankLinks:
    """A rank's end of the pipeline: the caller's minibatch, the header receive posted a
    clock ahead, and the gradient receives posted at each forward."""

    def __init__(self, stage: Stage, channel: Channel, layout: Layout):
        self.stage = stage
        self.channel = channel
        self.layout = layout
        self.grad_recvs: dict[int, GradientReceipt] = {}
        self._header: tuple[Any, Tensor] | None = None
        self.stream_ended = False
        self.fed: tuple[Value | None, Tensor | None, LossFn | None] = (None, None, None)
        if not stage.is_first:
            self._header = self.channel.post_header()

    def end_stream(self) -> None:
        """Tell the next stage no more forwards come, so its posted header receive completes."""
        if self.stream_ended:
            return
        self.stream_ended = True
        if self._header is not None:
            value, _ = self.channel.recv_value(self._header, self.stage.device)
            assert value is None, "an activation arrived after the stream ended"
            self._header = None
        if not self.stage.is_last:
            self.channel.send_value(None)

    def recv_activation(self, stage: Stage, minibatch: int) -> tuple[Value, bool]:
        if stage.is_first:
            x = self.fed[0]
            assert x is not None, "the first stage is fed its input"
            return map_tensors(x, lambda t: t.to(stage.device, non_blocking=True)), False
        assert self._header is not None, "a header receive is posted a clock ahead"
        value, head = self.channel.recv_value(self._header, stage.device)
        if value is None:
            raise RuntimeError("the previous stage ended its stream before this forward")
        self._header = self.channel.post_header()
        return value, head.overflow

    def send_activation(self, stage: Stage, minibatch: int, out: Value, overflow: bool) -> None:
        self.channel.send_value(out, overflow)
        # Whatever op consumes them (DDG's B, DNI's G), the gradients of the marked outputs
        # will come: their receives are posted now, long before the backward needs them.
        self.grad_recvs[minibatch] = self.channel.post_gradients(stage.inflight[-1].grad_shapes)

    def recv_gradient(self, stage: Stage, minibatch: int) -> tuple[Grads, float]:
        return self.channel.await_gradients(
            self.grad_recvs.pop(minibatch), stage.device,
            f"receiving the gradient of minibatch {minibatch} from rank {self.layout.next_rank}")

    def send_gradient(self, stage: Stage, minibatch: int, grads: Grads,
                      loss_scale: float) -> None:
        self.channel.send_gradients(grads, loss_scale)

    def target(self, stage: Stage, minibatch: int) -> tuple[Tensor, LossFn]:
        _, y, loss_fn = self.fed
        assert y is not None and loss_fn is not None, "the last stage is fed its target"
        return y.to(stage.device, non_blocking=True), loss_fn

    def keep_gradient(self, minibatch: int) -> list | None:
        """The gradient of ``minibatch`` if its receive was posted, awaited now and kept
        posted as received (a checkpoint saves it): ``[stage, minibatch, grads, scale]``."""
        if self.stage.is_last or minibatch not in self.grad_recvs:
            return None
        got, scale = self.recv_gradient(self.stage, minibatch)
        self.grad_recvs[minibatch] = self.channel.received(got, scale)  # not waited on twice
        return [self.stage.index, minibatch, [g.clone() for g in got], scale]

    def resume(self, saved: dict[int, tuple[tuple[Tensor, ...], float]]) -> None:
        """After a checkpoint: the ``saved`` gradients as received, the others posted anew."""
        if self.stage.is_last:
            return
        for pending in self.stage.inflight:
            m = pending.minibatch
            self.grad_recvs[m] = self.channel.received(*saved[m]) if m in saved else \
                self.channel.post_gradients(pending.grad_shapes)
