"""Timed cuts remembered per machine, so the same seed gives the same numbers.

Timing the pipeline picks the fastest cut (see :mod:`ddgpipe.balance.timed`), but timings are noisy:
two runs could choose different cuts, and a different cut trains a different DDG (another
set of delays per layer). The first timed choice for a given model, batch shape, schedule,
executor, device layout, thread count and machine is therefore written to
``<cache>/cuts.json`` (:func:`ddgpipe.cache.cache_dir`), and every later run with the same key
uses it: the same command, seed and machine give the same numbers, at full speed. ``--retime``
times the cut again and replaces the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from datetime import datetime, timezone

import torch
from torch import Tensor, nn

from ddgpipe.cache import cache_dir
from ddgpipe.core.schedule import Schedule
from ddgpipe.machine import cpu_name

__all__ = ["cut_key", "cached_cut", "remember_cut", "CUTS_FILE"]

CUTS_FILE = "cuts.json"


def _model_fingerprint(model: nn.Module) -> str:
    parts = [repr(model)]
    parts += [f"{n}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}"
              for n, p in model.named_parameters()]
    parts += [f"{n}:{tuple(b.shape)}:{b.dtype}" for n, b in model.named_buffers()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cut_key(model: nn.Module, sample_input: Tensor, schedule: Schedule, stash: str,
            precision: str, executor: str, devices: list[str], threads: int) -> str:
    """Everything the fastest cut depends on, as one string (the schedule's part:
    :meth:`~ddgpipe.core.schedule.Schedule.cut_fields`)."""
    gpus = []
    if any(d.startswith("cuda") for d in devices) and torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    fields = {
        "model": _model_fingerprint(model), "input": list(sample_input.shape),
        "dtype": str(sample_input.dtype), **schedule.cut_fields(), "stash": stash,
        "precision": precision, "executor": executor, "devices": devices, "threads": threads,
        "machine": [platform.machine(), cpu_name(), torch.backends.cpu.get_cpu_capability(),
                    os.cpu_count(), gpus],
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _read() -> dict:
    path = cache_dir() / CUTS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing or damaged: time the cut again
        return {}


def cached_cut(key: str) -> dict | None:
    """The remembered choice for ``key``: ``{"split", "profiled_split", "clock_ms", ...}``."""
    entry = _read().get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("split"), list):
        return None
    return entry


def remember_cut(key: str, choice: dict) -> None:
    """Store ``choice`` for ``key`` (atomically; an unwritable cache only costs a re-time)."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        entries = _read()
        entries[key] = {**choice, "timed_at": datetime.now(timezone.utc).isoformat()}
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
            json.dump(entries, f, indent=1)
            tmp = f.name
        os.replace(tmp, folder / CUTS_FILE)
    except OSError:
        pass
