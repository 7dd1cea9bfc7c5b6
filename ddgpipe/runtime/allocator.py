"""Keep freed memory inside the process, so training steps stop page-faulting on CPU.

Why and how: ``docs/design.md``, "The allocator setting".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["ENV_VAR", "allocator_setting", "tune_allocator"]

ENV_VAR = "DDGPIPE_MALLOC"
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
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
          and libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM) == 1)
    _state["tuned"] = ok
    return ok


def allocator_setting() -> str:
    """What this process runs with, in words, for the records of a run or a bench."""
    if _state["tuned"]:
        return "glibc malloc tuned: mmap threshold 32 MiB, no trimming"
    return "the platform's default allocator settings"
