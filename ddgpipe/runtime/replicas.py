"""Data parallelism across pipelines: what the R replicas of a stage share, and how.

Why and how: ``docs/design.md``, "Replicas: the gradient average".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ddgpipe.errors import PeerError

__all__ = ["GradientAverager", "average_buffers", "broadcast_module", "sum_over",
           "BUCKET_BYTES"]

BUCKET_BYTES = 1 << 20
"""Bucket size: small enough that a stage of a small ResNet has several buckets to overlap,
large enough that each all-reduce moves more than its latency's worth."""


class _Bucket:
    """Some parameters' gradients, flattened into one buffer that is all-reduced at once."""

    def __init__(self, names: list[str], params: Mapping[str, Tensor], wire: torch.device):
        self.names = names
        sizes = [params[n].numel() for n in names]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.slices = {n: (o, s) for n, o, s in zip(names, offsets, sizes, strict=True)}
        self.buffer = torch.zeros(sum(sizes), dtype=params[names[0]].dtype, device=wire)
        self.grads: dict[str, Tensor] = {}
        self.work: dist.Work | None = None

    def add(self, name: str, grad: Tensor) -> bool:
        """Copy ``grad`` in; True when the bucket holds every gradient it waits for."""
        offset, size = self.slices[name]
        self.buffer[offset: offset + size].copy_(grad.detach().reshape(-1))
        self.grads[name] = grad
        return len(self.grads) == len(self.names)


class GradientAverager:
    """Averages one stage's gradients over its replicas, bucket by bucket, during the backward.

    ``params`` are the stage's trainable parameters by name; ``group`` its data group of
    ``replicas`` ranks; ``wire`` where the buffers live (the stage's GPU under nccl, else the
    host); ``record_wait(start, end)`` is told how long :meth:`wait` blocked.
    """

    def __init__(self, params: Mapping[str, Tensor], group: dist.ProcessGroup, replicas: int,
                 *, wire: torch.device | None = None, timeout_s: float = 300.0,
                 bucket_bytes: int = BUCKET_BYTES, describe: str = "",
                 record_wait: Callable[[float, float], None] | None = None):
        self.group = group
        self.replicas = replicas
        self.timeout = timedelta(seconds=timeout_s)
        self.describe = describe
        self.record_wait = record_wait
        wire = wire or torch.device("cpu")
        self.buckets: list[_Bucket] = []
        current: list[str] = []
        size = 0
        for name in reversed(list(params)):  # the backward reaches the last layers first
            p = params[name]
            if current and (size + p.numel() * p.element_size() > bucket_bytes
                            or p.dtype != params[current[0]].dtype):
                self.buckets.append(_Bucket(current, params, wire))
                current, size = [], 0
            current.append(name)
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(_Bucket(current, params, wire))
        self.bucket_of = {n: b for b in self.buckets for n in b.names}
        self._launched: list[_Bucket] = []

    def _launch(self, bucket: _Bucket) -> None:
        bucket.work = dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, group=self.group,
                                      async_op=True)
        self._launched.append(bucket)

    @contextmanager
    def watching(self, leaves: dict[str, Tensor]) -> Iterator[None]:
        """Around a backward writing into ``leaves`` (by parameter name): start each bucket's
        all-reduce as soon as its gradients are there. Gradients the backward did not produce
        count as zeros, so every replica launches the same buckets in the same order."""
        if self._launched:
            raise RuntimeError("a backward ran before the previous gradients were averaged")

        def on_grad(name: str) -> Callable[[Tensor], None]:
            def hook(leaf: Tensor) -> None:
                bucket = self.bucket_of[name]
                assert leaf.grad is not None, "the hook runs once the gradient is accumulated"
                if bucket.add(name, leaf.grad):
                    self._launch(bucket)
            return hook

        handles = [leaves[n].register_post_accumulate_grad_hook(on_grad(n))
                   for n in self.bucket_of if n in leaves and leaves[n].requires_grad]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        for bucket in self.buckets:  # gradients the backward never produced: zeros
            if bucket.work is None:
                for name in bucket.names:
                    if name not in bucket.grads:
                        offset, size = bucket.slices[name]
                        bucket.buffer[offset: offset + size].zero_()
                self._launch(bucket)

    def wait(self) -> None:
        """Wait for every bucket and write the averages into the gradients they came from."""
        start = time.perf_counter()
        try:
            for bucket in self._launched:
                assert bucket.work is not None, "a launched bucket has its all-reduce"
                try:
                    bucket.work.wait(self.timeout)
                except Exception as e:  # gloo raises RuntimeError subclasses with C++ text
                    raise PeerError(f"{self.describe}: averaging gradients with the other "
                                    f"replicas failed: {str(e).splitlines()[0]}") from e
        finally:
            if self.record_wait is not None:
                self.record_wait(start, time.perf_counter())
        for bucket in self._launched:
            bucket.buffer.div_(self.replicas)
            for name, grad in bucket.grads.items():
                offset, size = bucket.slices[name]
                grad.copy_(bucket.buffer[offset: offset + size].view_as(grad))
            bucket.grads, bucket.work = {}, None
        self._launched = []


def average_buffers(module: nn.Module, group: dist.ProcessGroup, replicas: int,
                    wire: torch.device | None = None) -> None:
    """Replace every floating-point buffer of ``module`` (BatchNorm's running statistics) by
    its mean over the replicas; every replica ends with the same bits. Integer buffers (the
    batch counter) are the same on every replica already and are left alone."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    wire = wire or torch.device("cpu")
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for b in buffers:
        by_dtype.setdefault(b.dtype, []).append(b)
    for dtype in sorted(by_dtype, key=str):  # the same order on every replica
        group_buffers = by_dtype[dtype]
        flat = torch.cat([b.detach().reshape(-1).to(wire) for b in group_buffers])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(replicas)
        offset = 0
        for b in group_buffers:
            # Forwards still in flight saved the running statistics in their graphs (unused
            # by the training-mode backward); BatchNorm updates them in place without a
            # version bump, and so does this, or those backwards would refuse to run.
            with torch.autograd._unsafe_preserve_version_counter(b):
                b.copy_(flat[offset: offset + b.numel()].view_as(b))
            offset += b.numel()


def broadcast_module(module: nn.Module, group: dist.ProcessGroup, src: int,
                     wire: torch.device | None = None) -> None:
    """Give every replica the weights and buffers of rank ``src`` (replica 0), as DDP does at
    construction: replicas built from the same seed are equal already, and others must not
    silently train apart."""
    wire = wire or torch.device("cpu")
    for tensor in module.state_dict().values():
        staged = tensor.detach().to(wire)
        dist.broadcast(staged, src=src, group=group)
        if staged is not tensor:
            with torch.no_grad():
                tensor.copy_(staged)


def sum_over(values: list[float], group: dist.ProcessGroup) -> list[float]:
    """Each number summed over the ranks of ``group`` (float64), e.g. a stage's loss sums."""
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor.tolist()
