"""Tensors that cross from one stage to the next, on one GPU, across GPUs, or on the CPU.

Why and how: ``docs/design.md``, "Tensors between stages on GPUs".
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ddgpipe.core.values import Value, map_tensors, tensors

__all__ = ["Handoff", "new_stream", "on_stream", "send", "receive"]


def new_stream(device: torch.device) -> Any | None:
    """A fresh CUDA stream on ``device``; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.Stream(device=device)


@contextmanager
def on_stream(device: torch.device, stream=None):
    """Make ``device`` current (and ``stream`` its current stream) in this thread."""
    if device.type != "cuda":
        yield
        return
    with ExitStack() as stack:
        stack.enter_context(torch.cuda.device(device))
        if stream is not None:
            stack.enter_context(torch.cuda.stream(stream))
        yield


@dataclass
class Handoff:
    """Tensors on their way to another stage, with what the receiver needs to use them safely."""

    value: Value
    event: Any | None = None  # recorded on the producer's stream after the tensors were written
    stream: Any | None = None  # the producer's stream (CUDA), where cross-device copies go


def send(value: Value) -> Handoff:
    """Wrap ``value`` (a tensor or a tuple), produced on this thread's current stream, for
    another stage."""
    parts = tensors(value)
    if not parts or parts[0].device.type != "cuda":  # on the host, or no tensor at all
        return Handoff(value)
    device = parts[0].device
    stream = torch.cuda.current_stream(device)
    event = torch.cuda.Event()
    event.record(stream)
    return Handoff(value, event, stream)


def receive(handoff: Handoff, device: torch.device) -> Value:
    """The tensors on ``device``, safe to use on this thread's current stream there."""
    return map_tensors(handoff.value, lambda t: _arrive(t, handoff, device))


def _arrive(tensor: Tensor, handoff: Handoff, device: torch.device) -> Tensor:
    if tensor.device == device:
        if device.type == "cuda" and handoff.event is not None:
            here = torch.cuda.current_stream(device)
            if here != handoff.stream:
                here.wait_event(handoff.event)
                tensor.record_stream(here)
        return tensor
    if tensor.device.type == "cpu":  # a batch from the host: asynchronous when pinned
        return tensor.to(device, non_blocking=tensor.is_pinned())
    if device.type == "cpu":  # a GPU stage before a CPU stage: wait for it, then copy
        assert handoff.event is not None, "a GPU tensor is sent with its event"
        handoff.event.synchronize()
        return tensor.to(device)
    # GPU to GPU: copy on the producer's stream, after its kernels; the copy itself makes the
    # consumer's current stream wait for it, and the new tensor lives on the consumer's.
    with torch.cuda.stream(handoff.stream):
        return tensor.to(device, non_blocking=True)
