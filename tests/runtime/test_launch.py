"""The local launcher and the torchrun helpers (``tests/runtime/test_processes.py`` and
``test_replicas.py`` cover a raising or SIGKILLed stage inside a real pipeline; this covers
the launcher itself): results in rank order, each kind of failure named with its rank and
ranked above the peers that lost it, the global timeout, and no child left alive.

Workers are module-level functions (they are pickled into spawned processes), run over gloo
on 127.0.0.1 with bounded timeouts; each leaves its pid in a file so a test can check that
the process is gone, reaped, whatever happened to it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ddgpipe.errors import PeerError, Terminated, UsageError, WorkerError
from ddgpipe.runtime import devices, launch
from ddgpipe.runtime.launch import (
    free_port,
    init_from_env,
    process_backend,
    run_workers,
    under_torchrun,
)

ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


def leave_pid(folder: str, rank: int) -> None:
    with open(os.path.join(folder, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))


def pids(folder) -> list[int]:
    return [int(p.read_text()) for p in sorted(folder.glob("*.pid"))]


def gone(pid: int) -> bool:
    """Whether no process has this pid any more (a reaped child; an unreaped zombie stays)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_all_reaped(folder, expected: int) -> None:
    found = pids(folder)
    assert len(found) == expected, "every worker started and left its pid"
    assert all(gone(pid) for pid in found), found
    assert mp.active_children() == []


# --- the torchrun helpers, in this process ---------------------------------------------------

def test_free_port_can_be_bound_on_localhost():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("world,expected", [(None, False), ("1", False), ("2", True),
                                            ("8", True)])
def test_under_torchrun_reads_the_world_size(monkeypatch, world, expected):
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    assert under_torchrun() is expected


def test_init_from_env_outside_torchrun_joins_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() is False
    assert not dist.is_initialized()


def test_init_from_env_without_a_rendezvous_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UsageError, match=r"cannot join the process group at None:None \(.*"
                                         r"MASTER_ADDR.*\); check that the port is free"):
        init_from_env(timeout_s=5, backend="gloo")
    assert not dist.is_initialized()


@pytest.mark.parametrize("device,devices_,comm,cuda,expected", [
    ("cpu", None, "auto", 2, "gloo"),
    ("auto", None, "auto", 0, "gloo"),
    ("auto", None, "auto", 2, "cpu:gloo,cuda:nccl"),
    ("cuda", None, "auto", 2, "cpu:gloo,cuda:nccl"),
    ("cuda", None, "host", 2, "gloo"),  # host: every message through gloo
    ("cpu", ["cpu", "cuda:1"], "auto", 2, "cpu:gloo,cuda:nccl"),  # the per-stage list wins
    ("cuda", ["cpu", "cpu"], "auto", 2, "gloo"),
])
def test_process_backend(monkeypatch, device, devices_, comm, cuda, expected):
    monkeypatch.setattr(devices, "_cuda_count", lambda: cuda)
    assert process_backend(device, devices_, comm) == expected


def test_process_backend_refuses_a_gpu_that_is_not_there(monkeypatch):
    monkeypatch.setattr(devices, "_cuda_count", lambda: 1)
    with pytest.raises(UsageError, match="device 'cuda:3' does not exist: this machine has 1"):
        process_backend("cuda:3")
    with pytest.raises(UsageError, match="no CUDA device is available"):
        monkeypatch.setattr(devices, "_cuda_count", lambda: 0)
        process_backend("cpu", ["cpu", "cuda"])


# --- how the parent ranks what the children reported (no processes) ---------------------------

def test_a_usage_error_anywhere_wins_over_every_other_failure():
    outcome = {0: ("error", "RuntimeError: boom\ntraceback"), 1: ("died", "was killed by X"),
               2: ("usage", "pass --stages 2")}
    with pytest.raises(UsageError, match="^pass --stages 2$"):
        launch._collect(outcome, 3)


def test_the_rank_that_failed_is_named_not_the_peers_that_lost_it():
    outcome = {0: ("peer", "RuntimeError: Connection closed by peer\ntraceback"),
               2: ("died", "was killed by SIGKILL"),
               1: ("error", "ValueError: boom\ntraceback")}
    with pytest.raises(WorkerError) as caught:
        launch._collect(outcome, 3)
    assert caught.value.rank == 1
    assert str(caught.value) == "rank 1: ValueError: boom (ranks [0, 2] stopped after it)"
    with pytest.raises(WorkerError) as caught:
        launch._collect({0: ("peer", "PeerError: lost\n"), 1: ("died", "was killed by A")}, 2)
    assert caught.value.rank == 1  # a death explains a peer's loss, not the other way round
    with pytest.raises(WorkerError, match="^rank 1: PeerError: lost; the other workers were "
                                          "stopped$"):
        launch._collect({0: ("ok", None), 1: ("peer", "PeerError: lost\ntraceback")}, 2)


def test_results_are_in_rank_order_whatever_order_they_came_in():
    assert launch._collect({2: ("ok", "c"), 0: ("ok", "a"), 1: ("ok", "b")}, 3) == \
        ["a", "b", "c"]


def test_an_exit_is_described_by_its_signal_or_its_code():
    assert launch._describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert launch._describe_exit(-signal.SIGSEGV) == "was killed by SIGSEGV"
    assert launch._describe_exit(3) == "exited with code 3 without reporting"
    assert launch._describe_exit(0) == "exited with code 0 without reporting"


@pytest.fixture
def child_env(monkeypatch):
    """``_child`` sets the torchrun variables and the thread count of its process: run here,
    they are put back after the test."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def returns(rank, world):
    return ("ok", rank, world, dist.get_rank(), dist.get_world_size())


def raises_usage(rank, world):
    raise UsageError("a usage error")


def raises_peer(rank, world):
    raise PeerError("stage 1 is gone")


def raises_timeout(rank, world):
    raise RuntimeError("Wait timed out after 20 s\nmore lines")


def raises_other(rank, world):
    raise KeyError("missing")


@pytest.mark.parametrize("fn,kind,says", [
    (returns, "ok", ("ok", 0, 1, 0, 1)),
    (raises_usage, "usage", "a usage error"),
    (raises_peer, "peer", "PeerError: stage 1 is gone\n"),
    (raises_timeout, "peer", "RuntimeError: Wait timed out after 20 s\n"),
    (raises_other, "error", "KeyError: 'missing'\n"),
])
def test_a_child_reports_what_kind_of_end_it_had(child_env, fn, kind, says):
    """One rank, in this process: the kind decides how the parent ranks the report; a
    peer's loss is told by its type or its message; the group is always destroyed."""
    results: queue.Queue = queue.Queue()
    launch._child(0, 1, free_port(), 1, 10.0, "gloo", False, fn, (), results)
    rank, got_kind, value = results.get_nowait()
    assert (rank, got_kind) == (0, kind)
    if kind == "ok" or kind == "usage":
        assert value == says
    else:
        assert value.startswith(says) and "Traceback" in value
    assert not dist.is_initialized()
    assert torch.get_num_threads() == 1
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["WORLD_SIZE"] == "1"


# --- spawned workers ---------------------------------------------------------------------------

def reporting_worker(rank, world, folder, tag):
    leave_pid(folder, rank)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # the process group is up, over gloo
    if rank == 0:
        time.sleep(0.5)  # rank 1 reports first
    return {"rank": rank, "world": world, "tag": tag, "sum": total.item(),
            "group": (dist.get_rank(), dist.get_world_size(), dist.get_backend()),
            "env": {k: os.environ[k] for k in ENV}, "threads": torch.get_num_threads(),
            "at": time.monotonic()}


def test_results_come_back_in_rank_order_and_every_worker_is_reaped(tmp_path):
    results = run_workers(reporting_worker, 2, (str(tmp_path), "tag"), timeout_s=60, threads=2)
    assert [r["rank"] for r in results] == [0, 1]
    assert results[1]["at"] < results[0]["at"], "rank 1 did report first"
    for rank, r in enumerate(results):
        assert (r["world"], r["tag"], r["sum"]) == (2, "tag", 3.0)
        assert r["group"] == (rank, 2, "gloo")
        assert r["threads"] == 2
        assert r["env"]["MASTER_ADDR"] == "127.0.0.1"
        assert (r["env"]["RANK"], r["env"]["LOCAL_RANK"], r["env"]["WORLD_SIZE"]) == \
            (str(rank), str(rank), "2")
    assert results[0]["env"]["MASTER_PORT"] == results[1]["env"]["MASTER_PORT"]
    assert_all_reaped(tmp_path, 2)


def usage_worker(rank, world, folder):
    leave_pid(folder, rank)
    if rank == 1:
        raise UsageError("pass --stages 2 (rank 1 says)")
    return "finished"


@pytest.mark.slow
def test_a_usage_error_in_a_worker_is_a_usage_error_here(tmp_path):
    with pytest.raises(UsageError, match=r"^pass --stages 2 \(rank 1 says\)$"):
        run_workers(usage_worker, 2, (str(tmp_path),), timeout_s=60, threads=1)
    assert_all_reaped(tmp_path, 2)


def raising_worker(rank, world, folder):
    leave_pid(folder, rank)
    if rank == 1:
        raise ValueError("boom in rank 1")
    dist.barrier()  # waits for rank 1, which never comes: a peer's loss
    time.sleep(60)


@pytest.mark.slow
def test_another_error_is_a_worker_error_naming_its_rank(tmp_path):
    start = time.monotonic()
    with pytest.raises(WorkerError) as caught:
        run_workers(raising_worker, 2, (str(tmp_path),), timeout_s=60, peer_timeout_s=20,
                    threads=1, grace_s=0.5)
    assert caught.value.rank == 1
    assert str(caught.value).startswith("rank 1: ValueError: boom in rank 1")
    assert "Traceback" not in str(caught.value), "one line, not the child's traceback"
    assert time.monotonic() - start < 20
    assert_all_reaped(tmp_path, 2)


def dying_worker(rank, world, folder):
    leave_pid(folder, rank)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)


@pytest.mark.slow
def test_a_worker_killed_by_a_signal_is_named(tmp_path):
    """It dies without reporting; the parent tells it from its exit code (an exit code of its
    own reads as such: see test_an_exit_is_described_by_its_signal_or_its_code)."""
    start = time.monotonic()
    with pytest.raises(WorkerError) as caught:
        run_workers(dying_worker, 2, (str(tmp_path),), timeout_s=60, threads=1, grace_s=0.5)
    assert caught.value.rank == 1
    assert str(caught.value) == "rank 1: was killed by SIGTERM; the other workers were stopped"
    assert time.monotonic() - start < 20
    assert_all_reaped(tmp_path, 2)


def hanging_worker(rank, world, folder):
    leave_pid(folder, rank)
    if rank == 1:
        return "finished"
    time.sleep(60)


@pytest.mark.slow
def test_the_global_timeout_stops_every_worker(tmp_path):
    start = time.monotonic()
    with pytest.raises(WorkerError) as caught:
        # 8 s: both workers start (import torch, leave their pid) well within it on a busy
        # machine; 3 s was too short there
        run_workers(hanging_worker, 2, (str(tmp_path),), timeout_s=8, threads=1)
    elapsed = time.monotonic() - start
    assert caught.value.rank == 0
    assert str(caught.value) == "rank 0: no result within 8 s; all workers stopped"
    assert 8 <= elapsed < 20
    assert_all_reaped(tmp_path, 2)


# --- a launcher stopped from outside ---------------------------------------------------------

def sleeping_worker(rank, world, folder):
    leave_pid(folder, rank)
    time.sleep(120)


LAUNCHER = """
import sys
from ddgpipe.errors import Terminated
from ddgpipe.runtime.launch import run_workers
from tests.runtime.test_launch import sleeping_worker
try:
    run_workers(sleeping_worker, 2, (sys.argv[1],), timeout_s=120, threads=1)
except Terminated:
    sys.exit(143)
"""


def _start_launcher(folder) -> subprocess.Popen:
    """A launcher in a process of its own, returned once both of its workers are up."""
    root = Path(__file__).resolve().parents[2]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(folder)], cwd=root,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while len(pids(folder)) < 2:
        if launcher.poll() is not None or time.monotonic() > deadline:
            launcher.kill()
            launcher.wait()
            pytest.fail(f"the launcher's workers did not start (launcher exit {launcher.poll()})")
        time.sleep(0.1)
    return launcher


def _wait_gone(found: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not all(gone(pid) for pid in found):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("how", [pytest.param("SIGTERM", marks=pytest.mark.slow), "SIGKILL"])
def test_a_launcher_stopped_from_outside_leaves_no_worker(tmp_path, how):
    """SIGTERM: the launcher stops and reaps its workers before it exits. SIGKILL (no cleanup
    can run): each worker dies with it, by Linux's parent-death signal."""
    if how == "SIGKILL" and not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    launcher = _start_launcher(tmp_path)
    found = pids(tmp_path)
    try:
        launcher.send_signal(getattr(signal, how))
        code = launcher.wait(timeout=30)
        assert code == (143 if how == "SIGTERM" else -signal.SIGKILL)
        assert _wait_gone(found, within_s=10), f"workers {found} outlived their launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in found:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_raises_only_over_the_default_and_restores_it():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with launch.sigterm_raises():
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs between bytecodes, well before this ends
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def own(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with launch.sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) is own, "a program's own handler is kept"
    finally:
        signal.signal(signal.SIGTERM, previous)

    seen = []
    worker = threading.Thread(target=lambda: seen.append(_installs_off_main_thread()))
    worker.start()
    worker.join()
    assert seen == [False]


def _installs_off_main_thread() -> bool:
    with launch.sigterm_raises():
        return signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
