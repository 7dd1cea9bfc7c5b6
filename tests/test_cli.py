"""The command line as a user meets it: help, one-line errors with exit code 2, same seed same
numbers, and the parallel runtime reproducing the reference executor end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddgpipe.cli import build_parser, main

FAST = ["--model", "resnet20", "--data", "digits", "--epochs", "1", "--batch-size", "128",
        "--no-progress", "--threads", "1"]


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def epoch_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r for r in records if r["kind"] == "epoch"]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "wall_time")}
            for r in records]


def test_every_flag_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"ddgpipe {name} {action.option_strings} has no help text"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "resnet21"], "unknown model 'resnet21'; choose one of"),
        (["--data", "mnist"], "unknown data set 'mnist'"),
        (["--method", "sync"], "unknown method 'sync'; choose one of bp, ddg, dni"),
        (["--lr", "0"], "lr"),
        (["--lr", "-1"], "lr"),
        (["--batch-size", "0"], "--batch-size must be >= 1 (got 0)"),
        (["--batch-size", "100000"], "larger than the"),
        (["--epochs", "0"], "--epochs must be >= 1 (got 0)"),
        (["--method", "ddg", "--stages", "0"], "--stages must be >= 1 (got 0)"),
        (["--method", "ddg", "--stages", "12"], "cannot cut a model of 11 blocks into 12"),
        (["--method", "ddg", "--stages", "3", "--split", "4,4"], "leaves stage 1 empty"),
        (["--method", "ddg", "--stash", "all"], "unknown stash mode 'all'"),
        (["--method", "bp", "--stages", "2"], "--method bp runs the whole network"),
        (["--data", "cifar10"], "--data-dir is required for cifar10"),
        (["--method", "ddg", "--grad-shrink", "0"], "grad_shrink must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(extra, message, capsys, tmp_path):
    code, _, err = run_cli(["train", *FAST, "--out", str(tmp_path / "run"), *extra], capsys)
    assert code == 2
    assert err.startswith("ddgpipe: error: ") and err.count("\n") == 1, err
    assert message in err


def test_missing_and_corrupt_cifar_dirs(capsys, tmp_path):
    code, _, err = run_cli(["train", *FAST, "--data", "cifar10", "--data-dir",
                            str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "nowhere" in err and err.count("\n") == 1
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch"]:
        (batches / name).write_bytes(b"\x80\x02}q\x00(")  # a truncated pickle
    code, _, err = run_cli(["train", *FAST, "--data", "cifar10", "--data-dir", str(tmp_path),
                            "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "data_batch_1" in err and err.count("\n") == 1


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(["train", *FAST, "--out", str(blocker / "run")], capsys)
    assert code == 2 and "cannot write to output directory" in err


def test_errors_reach_the_shell_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ddgpipe", "train", "--model", "resnet21", "--out",
         str(tmp_path / "r")], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "ddgpipe: error: unknown model 'resnet21'; choose one of resnet20, resnet32, resnet44, "
        "resnet56, resnet110, mlp"
    ]


@pytest.mark.parametrize("method", [["--method", "bp"], ["--method", "ddg", "--stages", "3"]])
def test_same_seed_same_numbers(method, capsys, tmp_path):
    runs = []
    for name in ("a", "b"):
        code, out, _ = run_cli(["train", *FAST, *method, "--seed", "7", "--out",
                                str(tmp_path / name)], capsys)
        assert code == 0 and "test acc" in out
        runs.append(without_timing(epoch_records(tmp_path / name)))
    assert runs[0] == runs[1]
    code, _, _ = run_cli(["train", *FAST, *method, "--seed", "8", "--out",
                          str(tmp_path / "c")], capsys)
    assert without_timing(epoch_records(tmp_path / "c")) != runs[0]


def test_train_writes_metrics_plot_and_timeline(capsys, tmp_path):
    run = tmp_path / "ddg"
    code, out, _ = run_cli(["train", *FAST, "--epochs", "2", "--method", "ddg", "--stages", "2",
                            "--timeline", "--log-every", "5", "--out", str(run)], capsys)
    assert code == 0
    assert f"plot:    {run / 'curves.png'}" in out
    records = epoch_records(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "images_per_s",
            "wall_time"} <= set(records[0])
    iters = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in iters if r["kind"] == "iter"] == [5, 10, 15, 20]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "config.json").read_text())["split"] == [8]  # params-balanced
    code, out, _ = run_cli(["plot", "--timeline", str(run)], capsys)
    assert code == 0 and (run / "timeline.png").exists()


@pytest.mark.parametrize("method", ["ddg", "dni"])
def test_local_launcher_matches_the_reference_executor(method, capsys, tmp_path):
    """One process per stage gives the same numbers as all stages in one process."""
    common = [*FAST, "--method", method, "--stages", "2", "--epochs", "2",
              "--balance", "params"]
    assert main(["train", *common, "--out", str(tmp_path / "ref")]) == 0
    assert main(["train", *common, "--launcher", "local", "--timeout", "60",
                 "--out", str(tmp_path / "par")]) == 0
    capsys.readouterr()
    assert without_timing(epoch_records(tmp_path / "par")) == without_timing(
        epoch_records(tmp_path / "ref"))


def test_bench_command_reports_ratios_and_the_cost_model(capsys, tmp_path):
    code, out, _ = run_cli(["bench", "--model", "resnet20", "--image-size", "8", "--batch-size",
                            "16", "--steps", "2", "--warmup", "1", "--rounds", "1", "--configs",
                            "bp-1t,ddg-graph", "--no-progress", "--out", str(tmp_path)], capsys)
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["bp-1t", "ddg-graph"]
    assert result["rows"][0]["ratio_median"] == 1.0
    measured = result["cost_model"]["measured"]
    assert [m["name"] for m in measured] == ["ddg-graph"]
    assert measured[0]["predicted_images_per_s"] > 0
    assert [r["stages"] for r in result["cost_model"]["scaling"]["rows"]] == [2, 4, 8]
    assert "cost model" in out and (tmp_path / "bench.png").exists()
