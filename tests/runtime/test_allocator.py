"""The allocator settings every training process applies: freed memory is reused, not
faulted back in from the kernel at every step."""

import os
import subprocess
import sys

import pytest

CHURN = """
import resource, sys, threading, torch
import ddgpipe
print(ddgpipe.tune_allocator())
def churn():  # what a training step does: allocate activations, free them all
    ts = [torch.ones(2 * 1024 * 1024) for _ in range(4)]  # 4 x 8 MiB
    del ts
def rounds():
    for _ in range(5):  # warm up: the heap grows to the working set (a thread's arena
        # takes two rounds)
        churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        churn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if sys.argv[1] == "thread":  # as a stage of the threaded executor does
    worker = threading.Thread(target=rounds)
    worker.start()
    worker.join()
else:
    rounds()
"""


def run_churn(setting: str | None, where: str = "main") -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("DDGPIPE_MALLOC", "MALLOC_ARENA_MAX")}
    if setting is not None:
        env["DDGPIPE_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", CHURN, where], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
@pytest.mark.parametrize("where", ["main", "thread"])
def test_tuned_allocator_stops_refaulting_freed_memory(where):
    opted_out, _ = run_churn("default", where)
    assert not opted_out
    # 20 rounds of 32 MiB: an allocator that gives the memory back faults it in again every
    # round, 8192 faults a round with 4 KiB pages (glibc's defaults do so in most runs; its
    # adaptive threshold sometimes spares a run, so the default is not a stable yardstick).
    # Tuned, all 20 rounds together must fault less than half a round does (default runs
    # fault 8114 or more, tuned ones 0 or 2048 when the machine is quiet). The kernel may
    # still reclaim idle pages of a busy machine (seen once: 14336 faults with other jobs
    # running), so the tuning must win in one of three tries.
    best = None
    for _ in range(3):
        tuned, tuned_faults = run_churn(None, where)
        assert tuned
        best = tuned_faults if best is None else min(best, tuned_faults)
        if best < 4096:
            break
    assert best < 4096
