"""The command line as a user meets it: help, one-line errors with exit code 2, same seed same
numbers, and the parallel runtime reproducing the reference executor end to end."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddgpipe.cli import build_parser, main
from ddgpipe.errors import Terminated

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
    def check(parser, name: str) -> None:
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    check(sub, f"{name} {sub_name}")

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, sub in commands.items():
        check(sub, f"ddgpipe {name}")


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
        "resnet56, resnet110, resnet1d-20, resnet1d-32, resnet1d-44, resnet1d-56, resnet1d-110, "
        "mlp, gpt-L"
    ]


@pytest.mark.parametrize("method", [pytest.param(["--method", "bp"], marks=pytest.mark.slow),
                                    ["--method", "ddg", "--stages", "3"]])
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
    config = json.loads((run / "config.json").read_text())
    timed = config["split_tuning"]["clock_ms"]  # no --balance: this machine's timed cut
    assert config["split"] == config["split_tuning"]["split"]
    kept = config["split_tuning"]
    assert timed[str(config["split"][0])] == min(timed.values()) \
        or kept["chosen_by"].startswith("better balanced"), kept  # a balanced near-tie
    code, out, _ = run_cli(["plot", "--timeline", str(run)], capsys)
    assert code == 0 and (run / "timeline.png").exists()


@pytest.mark.parametrize("method", ["ddg", pytest.param("dni", marks=pytest.mark.slow)])
def test_every_executor_prints_the_reference_metrics(method, capsys, tmp_path):
    """A thread per stage, and a process per stage, give the numbers of all stages in turn on
    one thread (same cut, same threads per stage)."""
    common = [*FAST, "--method", method, "--stages", "2", "--epochs", "2",
              "--balance", "params", "--timeout", "60"]
    runs = {}
    for executor in ("reference", "threads", "processes"):
        assert main(["train", *common, "--executor", executor,
                     "--out", str(tmp_path / executor)]) == 0
        runs[executor] = without_timing(epoch_records(tmp_path / executor))
        config = json.loads((tmp_path / executor / "config.json").read_text())
        assert config["executor"] == executor
    capsys.readouterr()
    assert runs["threads"] == runs["reference"]
    assert runs["processes"] == runs["reference"]


def test_the_removed_launcher_flag_is_refused(capsys):
    """--launcher local was the old spelling of --executor processes; it is gone."""
    with pytest.raises(SystemExit) as stop:
        main(["train", "--method", "ddg", "--launcher", "local"])
    assert stop.value.code == 2
    assert "--launcher" in capsys.readouterr().err


def test_demo_reports_speed_and_time_to_accuracy_against_backprop(capsys, tmp_path):
    code, out, _ = run_cli(["demo", "--model", "mlp", "--epochs", "2", "--target", "0.5",
                            "--no-progress", "--out", str(tmp_path)], capsys)
    assert code == 0
    table = out[out.index("method"):].splitlines()
    assert table[0].split() == ["method", "test", "acc", "time", "to", "50%", "train", "time",
                                "images/s", "x", "backprop"]
    assert table[2].startswith("BP ") and table[2].endswith("1.00x")
    assert table[3].startswith("DDG K=2 ")
    verdict = next(line for line in out.splitlines() if line.startswith("DDG K=2: "))
    assert "x backprop's images/s" in verdict and "final test accuracy" in verdict
    for run in ("bp-k1", "ddg-k2"):
        assert (tmp_path / run / "metrics.jsonl").exists()
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_time_to_accuracy_is_the_first_epoch_at_the_target(tmp_path):
    from ddgpipe.cli.demo import time_to_accuracy

    records = [{"kind": "epoch", "test_acc": a, "wall_time": t}
               for a, t in ((0.5, 1.0), (0.97, 2.0), (0.96, 3.0), (0.99, 4.0))]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    assert time_to_accuracy(tmp_path, 0.97) == 2.0
    assert time_to_accuracy(tmp_path, 0.99) == 4.0
    assert time_to_accuracy(tmp_path, 0.995) is None


def test_compile_with_dni_is_refused_in_one_line(capsys, tmp_path):
    code, _, err = run_cli(["train", "--method", "dni", "--stages", "2", "--compile",
                            "--out", str(tmp_path / "r"), *FAST], capsys)
    assert code == 2
    assert "--compile" in err and "DNI" in err and "Traceback" not in err


def test_bench_command_reports_ratios_and_the_cost_model(capsys, tmp_path):
    code, out, _ = run_cli(["bench", "--model", "resnet20", "--image-size", "8", "--batch-size",
                            "16", "--steps", "2", "--warmup", "1", "--rounds", "1", "--configs",
                            "bp-1t,ddg-graph-threads", "--no-progress", "--out", str(tmp_path)],
                           capsys)
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["bp-1t", "ddg-graph-threads"]
    assert result["rows"][0]["ratio_median"] == 1.0
    measured = result["cost_model"]["measured"]
    assert [m["name"] for m in measured] == ["ddg-graph-threads"]
    assert measured[0]["predicted_images_per_s"] > 0
    assert [r["stages"] for r in result["cost_model"]["scaling"]["rows"]] == [2, 4, 8]
    assert "cost model" in out and (tmp_path / "bench.png").exists()


@pytest.mark.slow
def test_paper_cifar_preset_on_tiny_cifar_files(capsys, tmp_path):
    from tests.cifar_files import write_cifar10

    data_dir = write_cifar10(tmp_path / "data", n_per_batch=60)
    run = tmp_path / "run"
    code, out, _ = run_cli(["train", "--preset", "paper-cifar", "--data-dir", str(data_dir),
                            "--model", "resnet20", "--method", "ddg", "--stages", "2",
                            "--epochs", "1", "--threads", "1", "--no-progress", "--out",
                            str(run)], capsys)
    assert code == 0, out
    config = json.loads((run / "config.json").read_text())
    assert (config["data"], config["batch_size"], config["momentum"], config["weight_decay"],
            config["lr"], config["lr_schedule"], config["milestones"]) == (
        "cifar10", 128, 0.9, 5e-4, 0.1, "multistep", [150, 225])
    assert config["epochs"] == 1  # an explicit flag overrides the preset
    assert [r["iteration"] for r in epoch_records(run)] == [2]  # 300 images, batch 128


def test_paper_cifar_preset_warms_up_resnet110():
    parser = build_parser()
    from ddgpipe.cli.main import parse_args

    argv = ["train", "--preset", "paper-cifar", "--model", "resnet110"]
    args = parse_args(parser, argv)
    assert (args.warmup_epochs, args.warmup_factor, args.epochs) == (1, 0.1, 300)
    argv = ["train", "--preset", "paper-cifar", "--model", "resnet56"]
    assert parse_args(parser, argv).warmup_epochs == 0
    assert parser.parse_args(["train"]).batch_size is None  # the preset does not leak


def test_features_replay_is_ddg_with_stash_none(capsys, tmp_path):
    common = [*FAST, "--stages", "2", "--balance", "params"]
    assert main(["train", *common, "--method", "fr", "--out", str(tmp_path / "fr")]) == 0
    assert main(["train", *common, "--method", "ddg", "--stash", "none", "--out",
                 str(tmp_path / "none")]) == 0
    capsys.readouterr()
    assert without_timing(epoch_records(tmp_path / "fr")) == without_timing(
        epoch_records(tmp_path / "none"))


@pytest.mark.parametrize("raised,code,says", [
    (KeyboardInterrupt(), 130, "ddgpipe: interrupted"),
    (Terminated("SIGTERM"), 143, "ddgpipe: terminated (SIGTERM); every worker was stopped"),
])
def test_a_run_stopped_from_outside_ends_in_one_line(monkeypatch, capsys, raised, code, says):
    """Ctrl-C and SIGTERM (which the launcher turns into Terminated once its workers are
    stopped) end with the shell's code for the signal and one line, not a traceback."""
    def stopped(args):
        raise raised

    monkeypatch.setattr(sys.modules["ddgpipe.cli.main"], "cmd_train", stopped)
    assert main(["train", "--data", "digits"]) == code
    assert capsys.readouterr().err.strip() == says
