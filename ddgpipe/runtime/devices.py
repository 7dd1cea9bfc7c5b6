"""Which device each stage computes on.

``--device auto|cpu|cuda|cuda:N`` names one device for every stage (``auto``: CUDA when
available); a bare ``cuda`` spreads the stages over the visible GPUs, stage k on
``cuda:(k mod count)``. ``--devices cuda:0,cuda:1,...`` names one device per stage. Under
torchrun each rank's stage goes on ``cuda:LOCAL_RANK`` (modulo the GPUs of its node) when
CUDA is in use. A device that does not exist is a usage error, found before any work starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ddgpipe.errors import UsageError

__all__ = ["DEVICE_CHOICES", "resolve_device", "stage_devices", "rank_device", "describe",
           "cores_per_stage"]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``spec`` as a device that exists here; ``auto`` is CUDA when available, else the CPU.

    A bare ``cuda`` stays without an index (the caller decides how to spread stages).
    """
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda") if _cuda_count() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r}; choose {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise UsageError(f"device {spec!r} is not supported; choose {DEVICE_CHOICES}")
    count = _cuda_count()
    if count == 0:
        raise UsageError(f"device {spec!r} asked for, but no CUDA device is available here "
                         "(torch.cuda.is_available() is False); use --device cpu, or install "
                         "the torch build for your CUDA version")
    if device.index is not None and device.index >= count:
        raise UsageError(f"device {spec!r} does not exist: this machine has {count} CUDA "
                         f"device(s), cuda:0..cuda:{count - 1}")
    return device


def stage_devices(stages: int, device: str | torch.device = "auto",
                  devices: Sequence[str | torch.device] | None = None) -> list[torch.device]:
    """One device per stage: ``devices`` as given, or ``device`` for all (bare ``cuda``:
    stage k on ``cuda:(k mod count)``)."""
    if devices:
        if len(devices) != stages:
            raise UsageError(f"--devices names {len(devices)} device(s) for {stages} stages; "
                             f"give one per stage, e.g. "
                             f"{','.join(f'cuda:{k}' for k in range(stages))}")
        resolved = [resolve_device(d) for d in devices]
        return [torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d
                for d in resolved]
    base = resolve_device(device)
    if base.type == "cuda" and base.index is None:
        count = _cuda_count()
        return [torch.device("cuda", k % count) for k in range(stages)]
    return [base] * stages


def rank_device(device: str | torch.device = "auto",
                devices: Sequence[str | torch.device] | None = None) -> torch.device:
    """This rank's device under torchrun or the process launcher: ``devices[rank]`` when
    given, else ``cuda:LOCAL_RANK`` when CUDA is in use (modulo the node's GPUs), else the
    device as given."""
    if devices:
        rank = int(os.environ.get("RANK", "0"))
        if rank >= len(devices):
            raise UsageError(f"--devices names {len(devices)} device(s) but this is rank {rank}; "
                             "under the process runtime give one device per rank (K x R)")
        return stage_devices(len(devices), devices=devices)[rank]
    base = resolve_device(device)
    if base.type == "cuda" and base.index is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % _cuda_count())
    return base


def describe(devices: Sequence[torch.device]) -> str:
    """``cpu`` or ``cuda:0,cuda:1`` — for configs and messages."""
    names = [str(d) for d in devices]
    return names[0] if len(set(names)) == 1 else ",".join(names)


def cores_per_stage(workers: int) -> int:
    """Each of ``workers`` stages' (threads' or processes') share of this machine's cores, at
    least one: K workers must not fight over the same cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
