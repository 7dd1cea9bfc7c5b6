"""``--resume RUN`` alone resumes with the run's saved settings; beside it, flags may change
only the run's length, evaluation and checkpoint cadence, --stop-after, progress and logging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddgpipe.cli import main

RUN = ["train", "--model", "mlp", "--data", "digits", "--batch-size", "32", "--threads", "1",
       "--no-progress", "--balance", "params", "--method", "ddg", "--stages", "3",
       "--executor", "reference", "--iterations", "40", "--lr", "0.05", "--eval-every", "10",
       "--checkpoint-every", "5", "--seed", "2", "--compensation", "dc", "--dc-lambda", "0.5"]
TIMES = ("wall_time", "samples_per_s", "images_per_s")


def records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (a, b))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddgpipe: error: "), err
    return lines[0]


def stop_a_run(run: Path) -> Path:
    """A run stopped after 13 of its 40 iterations, mid-pipeline."""
    assert main([*RUN, "--out", str(run), "--stop-after", "13"]) == 0
    return run


@pytest.fixture
def stopped(tmp_path, capsys) -> Path:
    run = stop_a_run(tmp_path / "cut")
    assert "stopped after iteration 13" in capsys.readouterr().err
    return run


@pytest.fixture(scope="module")
def stopped_once(tmp_path_factory) -> Path:
    """One stopped run, shared by the tests that only try flags on it."""
    return stop_a_run(tmp_path_factory.mktemp("resume") / "cut")


@pytest.mark.slow
def test_resume_alone_ends_bitwise_like_the_uninterrupted_run(stopped, tmp_path, capsys):
    assert main([*RUN, "--out", str(tmp_path / "full")]) == 0
    assert main(["train", "--resume", str(stopped)]) == 0
    assert_same_weights(tmp_path / "full", stopped)
    assert records(tmp_path / "full") == records(stopped)
    assert len(records(stopped)) == 5  # evaluations at 10, 20, 30 and the end, the epoch


@pytest.mark.parametrize("flags, says", [
    (["--lr", "0.1"], "--lr: saved 0.05, given 0.1"),
    (["--seed", "3", "--stages", "2"], "--stages: saved 3, given 2; --seed: saved 2, given 3"),
    (["--dc-lambda", "0.25"], "--dc-lambda: saved 0.5, given 0.25"),
    (["--threads", "2"], "--threads: saved 1, given 2"),
    (["--iterations", "12"], "--iterations 12 is shorter than the saved run's 40"),
])
def test_a_flag_that_changes_the_numbers_is_refused_naming_it(flags, says, stopped_once,
                                                              capsys):
    assert main(["train", "--resume", str(stopped_once), *flags]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert says in error and f"--resume {stopped_once} continues the run" in error


@pytest.mark.slow
def test_safe_flags_beside_resume_are_taken(stopped, tmp_path, capsys):
    """More iterations, another cadence and logging: the run goes on, to 50 iterations."""
    assert main(["train", "--resume", str(stopped), "--iterations", "50", "--eval-every", "25",
                 "--checkpoint-every", "0", "--log-every", "7", "--log", "csv"]) == 0
    kinds = [(r["kind"], r["iteration"]) for r in records(stopped)]
    assert kinds == [("eval", 10), ("iter", 14), ("iter", 21), ("eval", 25), ("iter", 28),
                     ("iter", 35), ("iter", 42), ("epoch", 44), ("iter", 49), ("eval", 50),
                     ("epoch", 50)]  # 44 minibatches of 32 an epoch
    assert (stopped / "metrics-iter.csv").exists()


def test_retyping_the_runs_own_flags_is_still_accepted(stopped_once, capsys):
    """The command that started the run, with --resume for --out, checks out (as before)."""
    assert main([*RUN, "--resume", str(stopped_once), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "lr = 0.05\n" in printed and "# stop_after = (unset)\n" in printed
