"""Checkpoint/resume: stopped or killed mid-pipeline, a run resumes to bitwise the weights of
an uninterrupted one; sets are written atomically and checked before loading."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ddgpipe
from ddgpipe.cli import main
from ddgpipe.methods.microbatches import split_minibatch
from tests.helpers import batches, dropout_mlp

BASE = ["train", "--model", "resnet20", "--data", "digits", "--epochs", "2", "--batch-size",
        "128", "--threads", "1", "--no-progress", "--balance", "params"]


def weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def epoch_lines(run: Path) -> list[dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "wall_time")}
            for r in records if r["kind"] == "epoch"]


METHODS = {
    "bp": ["--method", "bp"],
    "ddg-graph": ["--method", "ddg", "--stages", "3", "--stash", "graph", "--executor",
                  "reference"],
    "ddg-recompute": ["--method", "ddg", "--stages", "3", "--stash", "recompute",
                      "--executor", "reference"],
    "ddg-graph-threads": ["--method", "ddg", "--stages", "3", "--stash", "graph",
                          "--executor", "threads"],
    "ddg-microbatches": ["--method", "ddg", "--stages", "3", "--microbatches", "4",
                         "--executor", "reference"],
}


QUICK_METHODS = ("ddg-graph", "ddg-microbatches")  # the others: slow


@pytest.mark.parametrize("name", [
    name if name in QUICK_METHODS else pytest.param(name, marks=pytest.mark.slow)
    for name in METHODS])
def test_stop_and_resume_is_bitwise_the_uninterrupted_run(name, tmp_path, capsys):
    args = [*BASE, *METHODS[name], "--checkpoint-every", "4"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    # Stop inside the first epoch, in the middle of the pipeline, then go on.
    assert main([*args, "--out", str(tmp_path / "cut"), "--stop-after", "7"]) == 0
    assert "stopped after iteration 7" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "cut/checkpoints/latest.json").read_text())
    assert manifest["iteration"] == 7
    assert main([*args, "--resume", str(tmp_path / "cut")]) == 0
    assert_same_weights(tmp_path / "full", tmp_path / "cut")
    assert epoch_lines(tmp_path / "full") == epoch_lines(tmp_path / "cut")


def test_a_checkpoint_of_the_threads_resumes_under_the_reference(tmp_path, capsys):
    """Both in-process executors write the same state: stop under one, resume under the
    other, and get the uninterrupted run's weights."""
    args = [*BASE, "--method", "ddg", "--stages", "3", "--checkpoint-every", "4"]
    assert main([*args, "--executor", "reference", "--out", str(tmp_path / "full")]) == 0
    assert main([*args, "--executor", "threads", "--out", str(tmp_path / "cut"),
                 "--stop-after", "6"]) == 0
    assert main([*args, "--executor", "reference", "--resume", str(tmp_path / "cut")]) == 0
    capsys.readouterr()
    assert_same_weights(tmp_path / "full", tmp_path / "cut")
    assert epoch_lines(tmp_path / "full") == epoch_lines(tmp_path / "cut")


@pytest.mark.slow
def test_epoch_checkpoints_and_pruning(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*BASE, "--method", "ddg", "--stages", "2", "--epochs", "4",
            "--checkpoint-every-epochs", "1", "--out", str(run)]
    assert main(args) == 0
    sets = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert sets == ["iter-000022", "iter-000033"]  # 11 iterations an epoch; two kept
    assert main([*args[:-2], "--resume", str(run)]) == 0  # resumes at epoch 4 of 4
    assert [r["epoch"] for r in epoch_lines(run)] == [1, 2, 3, 4]


FALLBACK = ["train", "--model", "mlp", "--data", "digits", "--method", "ddg", "--stages", "2",
            "--iterations", "30", "--batch-size", "64", "--checkpoint-every", "5",
            "--executor", "reference", "--threads", "1", "--balance", "params", "--no-progress"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [
    lambda s: _truncate(s / "rank-0.pt"),
    lambda s: (s / "rank-0.pt").unlink(),
    lambda s: _truncate(s / "manifest.json"),
], ids=["truncated-file", "missing-file", "truncated-manifest"])
def test_a_damaged_newest_set_falls_back_to_the_older_one(damage, tmp_path, capsys):
    """The two newest sets are kept: with the newest damaged, the resume says so, continues
    from the older one and ends bitwise like the uninterrupted run."""
    assert main([*FALLBACK, "--out", str(tmp_path / "full")]) == 0
    cut = tmp_path / "cut"
    assert main([*FALLBACK, "--out", str(cut), "--stop-after", "20"]) == 0
    capsys.readouterr()
    damage(cut / "checkpoints" / "iter-000020")
    assert main([*FALLBACK, "--resume", str(cut)]) == 0
    err = capsys.readouterr().err
    assert "iter-000020 is damaged" in err
    assert "resuming from iter-000015 (iteration 15), the newest intact set" in err
    assert_same_weights(tmp_path / "full", cut)
    assert epoch_lines(tmp_path / "full") == epoch_lines(cut)


def test_a_set_being_written_when_the_run_stopped_is_passed_over_quietly(tmp_path):
    """A folder newer than the published set, without a manifest, was never complete: not
    damage, nothing to report."""
    from ddgpipe.training.checkpoints import newest_intact_set

    run = tmp_path / "run"
    assert main([*FALLBACK, "--out", str(run), "--stop-after", "10"]) == 0
    (run / "checkpoints" / "iter-000015").mkdir()
    (run / "checkpoints" / "iter-000015" / "rank-0.pt").write_bytes(b"partial")
    found = newest_intact_set(run)
    assert found.folder.name == "iter-000010" and found.fallback_note() is None


def _workers_of(pid: int) -> list[int]:
    """Child processes of ``pid`` that are spawned multiprocessing workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _kill_one_worker_and_resume(tmp_path: Path, args: list[str], workers: int,
                                victim: int = 0) -> Path:
    """Start ``ddgpipe train ARGS``, SIGKILL one of its ``workers`` processes (the
    ``victim``-th started, by process id) once a set past
    iteration 20 is published, resume, and check the weights and metrics against an
    uninterrupted run. Returns the resumed run's directory."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "ddgpipe", "train", *args, "--out", str(cut)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    killed = False
    try:
        deadline = time.monotonic() + 120
        latest = cut / "checkpoints" / "latest.json"
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.exists() and json.loads(latest.read_text())["iteration"] >= 20:
                found = _workers_of(proc.pid)
                if len(found) == workers:
                    os.kill(found[victim], signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert killed, "the run ended before a worker could be killed"
    assert proc.returncode != 0 and "rank" in err, err
    assert not _workers_of(proc.pid)
    assert main(["train", *args, "--resume", str(cut)]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "full")]) == 0
    assert_same_weights(tmp_path / "full", cut)
    assert epoch_lines(tmp_path / "full") == epoch_lines(cut)
    return cut


@pytest.mark.slow
@pytest.mark.parametrize("stash", ["graph", "recompute"])
def test_a_killed_worker_resumes_bitwise(stash, tmp_path):
    """One stage process is SIGKILLed mid-run; resuming from the last complete set gives the
    uninterrupted run's weights."""
    args = [*BASE[1:], "--method", "ddg", "--stages", "2", "--stash", stash, "--batch-size", "32",
            "--checkpoint-every", "10", "--executor", "processes", "--timeout", "60"]
    _kill_one_worker_and_resume(tmp_path, args, workers=2)


@pytest.mark.slow
def test_a_killed_replica_resumes_bitwise(tmp_path):
    """K = 2 stages x R = 2 replicas, four processes, BatchNorm in every stage: one process
    is SIGKILLed mid-epoch; each replica resumes from its stage's one copy (written by
    replica 0) plus its own in-flight state, to the uninterrupted run's weights."""
    args = [*BASE[1:], "--method", "ddg", "--stages", "2", "--replicas", "2", "--epochs", "1",
            "--batch-size", "32", "--checkpoint-every", "10", "--executor", "processes",
            "--timeout", "60"]
    cut = _kill_one_worker_and_resume(tmp_path, args, workers=4, victim=2)
    latest = json.loads((cut / "checkpoints" / "latest.json").read_text())
    manifest = json.loads((cut / "checkpoints" / latest["set"] / "manifest.json").read_text())
    assert sorted(e["name"] for e in manifest["files"]) == [
        "rank-0.pt", "rank-1.pt", "rank-2.pt", "rank-3.pt", "stage-0.pt", "stage-1.pt"]
    assert manifest["config"]["replicas"] == 2


def test_replicas_are_a_setting_a_resume_must_share():
    from ddgpipe.training.checkpoints import check_compatible

    with pytest.raises(ddgpipe.UsageError, match="replicas: 2 in the checkpoint, 1 now"):
        check_compatible({"replicas": 2}, {"replicas": 1}, "run")
    check_compatible({}, {"replicas": 1}, "run")  # a set from before replicas: one pipeline


def _dropout_pipe(stash: str) -> ddgpipe.DDG:
    return ddgpipe.DDG(dropout_mlp(), 3, lambda ps: torch.optim.SGD(ps, lr=0.1), split=[1, 2],
                       stash=stash)


@pytest.mark.parametrize("stash", ["graph", "recompute"])
def test_reference_resume_continues_every_stage_random_stream(stash):
    """Mid-pipeline, each stage's own RNG stream is part of the state: dropout in every stage
    draws after resuming exactly what it would have drawn, whatever the caller's RNG."""
    data = batches(9, (6,), sizes=4, classes=3)
    uninterrupted = _dropout_pipe(stash)
    for x, y in data:
        uninterrupted.step(x, y, F.cross_entropy)
    uninterrupted.drain()

    first = _dropout_pipe(stash)
    for x, y in data[:4]:
        first.step(x, y, F.cross_entropy)
    saved = io.BytesIO()
    torch.save(first.checkpoint_state(), saved)
    resumed = _dropout_pipe(stash)
    resumed.load_checkpoint_state(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    torch.manual_seed(999)  # a different caller RNG must not reach the stages
    for x, y in data[4:]:
        resumed.step(x, y, F.cross_entropy)
    resumed.drain()
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def _microbatched_pipe(stash: str, executor: str) -> ddgpipe.DDG:
    return ddgpipe.DDG(dropout_mlp(), 3, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                       split=[1, 2], stash=stash, microbatches=2, executor=executor)


@pytest.mark.parametrize("stash, executors", [("graph", ("reference", "threads")),
                                              ("recompute", ("threads", "reference"))])
def test_a_checkpoint_between_the_clocks_of_a_microbatched_step_resumes_bitwise(stash,
                                                                                 executors):
    """Taken through the executor after an odd number of microbatches, mid-step, the state
    holds each stage's gradients summed so far and their count; resumed (under the other
    executor) the run ends where the uninterrupted one does."""
    data = batches(6, (6,), sizes=4, classes=3)
    micro = [part for x, y in data for part in split_minibatch(x, y, 2)]
    uninterrupted = _microbatched_pipe(stash, "reference")
    for x, y in data:
        uninterrupted.step(x, y, F.cross_entropy)
    uninterrupted.drain()

    first = _microbatched_pipe(stash, executors[0])
    for x, y in micro[:7]:  # stage 1 and 2 have summed one gradient of their next step
        first.executor.step(x, y, F.cross_entropy)
    state = first.checkpoint_state()
    first.close()
    assert [s.get("gradient_sum", {}).get("count", 0) for s in state["stages"]] == [1, 1, 1]
    saved = io.BytesIO()
    torch.save(state, saved)
    resumed = _microbatched_pipe(stash, executors[1])
    resumed.load_checkpoint_state(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    for x, y in micro[7:]:
        resumed.executor.step(x, y, F.cross_entropy)
    resumed.drain()
    assert resumed.fed == uninterrupted.fed == 6
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
