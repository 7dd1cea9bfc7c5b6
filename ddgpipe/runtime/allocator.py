"""Keep freed memory inside the process, so training steps stop page-faulting on CPU.

Every training step allocates and frees the same few hundred megabytes of activations. By
default glibc's malloc serves large blocks with fresh ``mmap`` calls (its threshold adapts,
but only up to 32 MiB and only after a block was freed) and hands memory at the top of the
heap back to the kernel once more than a threshold is free. The next step then faults every
page back in, zero-filled by the kernel. On the 2-core machine of ``benchmarks/`` a ResNet-56
backprop step (batch 128, one thread) spent 0-95 ms per step in the kernel this way, varying
from run to run, and a DDG stage that keeps two minibatches' graphs alive spent more.

Fixing the mmap threshold at its maximum and never trimming makes malloc reuse its own free
memory: the process's peak footprint is unchanged (it already held that memory at the peak),
it only stops returning it between steps.

Threads need one more setting. glibc gives each new thread an arena of its own, made of 64 MiB
heaps that are unmapped as soon as they are empty, whatever the trim threshold; a stage of
the threaded executor frees its activations every clock, so its heaps came and went: stage 0
of ResNet-56 (batch 128, its own thread) took 200,000-400,000 page faults per 10 s, against
none on the main thread. One arena for the whole process (``M_ARENA_MAX`` 1) puts every thread
on the main heap, which keeps its memory; allocations are few next to the kernels between
them, so sharing its lock costs nothing measurable.

``DDGPIPE_MALLOC=default`` in the environment opts out. Off glibc (macOS, musl) this does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["ENV_VAR", "allocator_setting", "tune_allocator"]

ENV_VAR = "DDGPIPE_MALLOC"
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses more on 64-bit
_NO_TRIM = 2**31 - 1  # mallopt takes an int

_state = {"tuned": False}


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


def tune_allocator() -> bool:
    """Apply the settings above to this process; True when they are in effect.

    Call it once, early, in every training process (the launcher's workers, torchrun's and
    the bench's do; the threaded executor does when it starts its threads). It only changes
    future allocations and arenas, so calling it twice is harmless.
    """
    if _state["tuned"]:
        return True
    if os.environ.get(ENV_VAR, "tuned").lower() == "default":
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM) == 1
          and libc.mallopt(_M_ARENA_MAX, 1) == 1)
    _state["tuned"] = ok
    return ok


def allocator_setting() -> str:
    """What this process runs with, in words, for the records of a run or a bench."""
    if _state["tuned"]:
        return "glibc malloc tuned: mmap threshold 32 MiB, no trimming, one arena"
    return "the platform's default allocator settings"
