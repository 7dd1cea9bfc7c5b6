"""Start one process per stage: spawned here (``--executor processes``) or by torchrun.

The local launcher owns its children: it reports the first real failure (a worker that
raised, or died from a signal) with the rank, stops every other worker within seconds, and
always reaps them, so a failed run never leaves orphans or hangs. A launcher stopped from
outside does too: SIGTERM stops the workers before the launcher exits, and on Linux a worker
whose launcher was killed outright (SIGKILL) is killed with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import random
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ddgpipe.errors import PeerError, Terminated, UsageError, WorkerError
from ddgpipe.runtime.allocator import tune_allocator
from ddgpipe.runtime.devices import cores_per_stage, resolve_device

__all__ = ["free_port", "run_workers", "init_from_env", "under_torchrun", "process_backend",
           "sigterm_raises"]

_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, chosen below the kernel's ephemeral
    range where it can be: a port from that range may be taken again by an outgoing
    connection (an earlier run's store client) before rank 0 listens on it (EADDRINUSE)."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(64):
        port = rng.randrange(10000, low) if low > 10000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; else 0: any port will do)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_backend(device: str = "auto", devices=None, comm: str = "auto") -> str:
    """The process group's backend: gloo for CPU tensors, plus nccl for GPU ones when stages
    compute on GPUs and ``comm`` is ``auto`` (``host`` keeps every message on gloo)."""
    names = list(devices) if devices else [device]
    on_gpu = any(resolve_device(d).type == "cuda" for d in names)
    return "cpu:gloo,cuda:nccl" if on_gpu and comm == "auto" else "gloo"


def init_from_env(timeout_s: float = 300.0, backend: str | None = None) -> bool:
    """Join the process group torchrun describes in the environment; False when not under it."""
    if not under_torchrun():
        return False
    if not dist.is_initialized():
        backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:  # DistNetworkError/DistStoreError included
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise UsageError(
                f"cannot join the process group at {where} ({str(e).splitlines()[0]}); check "
                "that the port is free (another run may hold it) and the host reachable"
            ) from None
    return True


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While workers run, SIGTERM raises :class:`Terminated` instead of ending the process at
    once, so the cleanup that stops and reaps them runs. Only on the main thread and only over
    the default action, so a program that set its own handler keeps it."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def handle(signum, frame) -> None:
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _die_with_parent() -> None:
    """A spawned worker must not outlive its launcher, even one killed by SIGKILL (which no
    cleanup sees): Linux's parent-death signal kills it too. Elsewhere only the launcher's own
    cleanup stops it."""
    parent = mp.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return  # not spawned, or no prctl
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent.pid:  # the launcher died before the signal was armed
        os._exit(1)


def thread_locked_bars() -> None:
    """tqdm's default lock is a multiprocessing semaphore that a worker stopped by a signal
    never unlinks (a "leaked semaphore" warning at exit); bars drawn by one process need only
    a thread lock. Called first thing in every worker process."""
    tqdm.set_lock(threading.RLock())


def _child(rank, world_size, port, threads, timeout_s, backend, tune_malloc, fn, args, results):
    if mp.parent_process() is not None:  # a spawned worker, not a test calling this in-process
        _die_with_parent()
        thread_locked_bars()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    if tune_malloc:
        tune_allocator()
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except UsageError as e:
        results.put((rank, "usage", str(e)))
    except BaseException as e:  # report anything, the parent decides what to show
        kind = "peer" if isinstance(e, PeerError) or _looks_like_peer_loss(e) else "error"
        summary = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        results.put((rank, kind, summary + "\n" + traceback.format_exc(limit=6)))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def _looks_like_peer_loss(e: BaseException) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("connection closed", "connection reset", "broken pipe",
                                   "timed out", "timeout"))


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code} without reporting"


def run_workers(
    fn: Callable,
    world_size: int,
    args: tuple = (),
    *,
    timeout_s: float | None = None,
    peer_timeout_s: float = 300.0,
    threads: int | None = None,
    grace_s: float = 2.0,
    backend: str = "gloo",
    tune_malloc: bool = True,
) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes over
    ``backend`` (gloo; ``cpu:gloo,cuda:nccl`` when the stages compute on GPUs).

    Each worker is a process of its own, started here for this run, so by default it keeps
    the memory it frees (``tune_malloc``, :func:`ddgpipe.runtime.allocator.tune_allocator`).
    ``timeout_s`` bounds the whole run (None: no bound); ``peer_timeout_s`` bounds every wait
    for a peer inside the process group. Returns the results in rank order. Raises
    :class:`UsageError` if a worker raised one,
    :class:`WorkerError` for any other failure (naming the rank that failed first, not the
    peers that lost it), always after stopping and reaping every worker.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = threads or cores_per_stage(world_size)
    procs = [ctx.Process(target=_child, daemon=True,
                         args=(r, world_size, port, threads, peer_timeout_s, backend,
                               tune_malloc, fn, args, results))
             for r in range(world_size)]
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(sigterm_raises())
        cleanup.callback(_stop, procs)  # on any exit: SIGTERM, Ctrl-C, a failure or success
        for p in procs:
            p.start()
        outcome = _outcomes(procs, results, timeout_s, grace_s)
    return _collect(outcome, world_size)


def _outcomes(procs: list, results, timeout_s: float | None,
              grace_s: float) -> dict[int, tuple[str, object]]:
    """Each worker's report (or how it died), gathered until all came, or ``grace_s`` after
    the first failure; a WorkerError when ``timeout_s`` passes first."""
    world_size = len(procs)
    outcome: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout_s if timeout_s is not None else float("inf")
    first_failure: float | None = None
    while len(outcome) < world_size:
        try:
            rank, kind, value = results.get(timeout=0.1)
            outcome[rank] = (kind, value)
        except queue.Empty:
            pass
        for rank, p in enumerate(procs):
            if rank not in outcome and p.exitcode is not None:
                try:  # it may have reported just before exiting
                    rank2, kind, value = results.get(timeout=0.5)
                    outcome[rank2] = (kind, value)
                except queue.Empty:
                    outcome[rank] = ("died", _describe_exit(p.exitcode))
        failed = [r for r, (kind, _) in outcome.items() if kind != "ok"]
        if failed and first_failure is None:
            first_failure = time.monotonic()
        if first_failure is not None and time.monotonic() - first_failure > grace_s:
            break
        if time.monotonic() > deadline:
            raise WorkerError(min(set(range(world_size)) - set(outcome), default=0),
                              f"no result within {timeout_s:.0f} s; all workers stopped")
    return outcome


def _collect(outcome: dict, world_size: int) -> list:
    for wanted in ("usage", "error", "died", "peer"):
        for rank in sorted(outcome):
            kind, value = outcome[rank]
            if kind != wanted:
                continue
            if kind == "usage":
                raise UsageError(value)
            raise WorkerError(rank, value.splitlines()[0] + _others_note(outcome, rank))
    return [outcome[r][1] for r in range(world_size)]


def _others_note(outcome: dict, rank: int) -> str:
    others = [r for r, (kind, _) in outcome.items() if r != rank and kind != "ok"]
    return f" (ranks {others} stopped after it)" if others else "; the other workers were stopped"


def _stop(procs: list) -> None:
    procs = [p for p in procs if p.pid is not None]  # started ones only
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
