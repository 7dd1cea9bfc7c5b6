"""The experiments' quick variants end to end, resuming a grid, and their arithmetic."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ddgpipe.cli import main
from ddgpipe.experiments.common import DIVERGED_FILE, _train_one, read_outcome
from ddgpipe.experiments.paper import ExperimentPlan, summarise_runs
from ddgpipe.train import TrainConfig


def test_quick_paper_experiment(tmp_path, capsys):
    assert main(["experiment", "paper", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    got = {(r["method"], r["stages"]) for r in summary["rows"]}
    assert got == {("bp", 1), ("ddg", 2), ("ddg", 4), ("dni", 2), ("dni", 4)}
    assert all(0 <= r["test_acc_mean"] <= 100 for r in summary["rows"])
    report = (tmp_path / "results.md").read_text()
    assert "| sgd-constant | DDG | 4 |" in report and report in out
    for png in ("loss-sgd-constant.png", "accuracy-vs-k.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sgd-constant" / "ddg-k2-s0" / "metrics.jsonl").exists()


def test_summary_means_stds_and_gaps():
    def run(method, k, seed, acc, loss):
        return {"out": f"x/momentum/{method}-k{k}-s{seed}", "method": method, "stages": k,
                "test_acc": acc, "train_loss": loss}

    results = [run("bp", 1, 0, 0.98, 0.1), run("bp", 1, 1, 0.96, 0.3),
               run("ddg", 2, 0, 0.95, 0.2), run("ddg", 2, 1, 0.95, 0.2)]
    summary = summarise_runs(results, ExperimentPlan())
    rows = {(r["method"], r["stages"]): r for r in summary["rows"]}
    bp, ddg = rows[("bp", 1)], rows[("ddg", 2)]
    assert bp["test_acc_mean"] == pytest.approx(97.0)
    assert bp["test_acc_std"] == pytest.approx(2 ** 0.5)
    assert ddg["gap_to_bp_pp"] == pytest.approx(-2.0)
    assert bp["train_loss_mean"] == pytest.approx(0.2)


def test_bad_experiment_input(capsys):
    assert main(["experiment", "paper", "--quick", "--stages", "1,2"]) == 2
    assert "--stages must all be >= 2" in capsys.readouterr().err


# ---- the grid runner -----------------------------------------------------------------------


def write_run(run_dir: Path, config: TrainConfig, epochs: int) -> None:
    run_dir.mkdir(parents=True)
    saved = dataclasses.asdict(config) | {"label": "DDG K=2", "split": [3], "num_blocks": 11}
    (run_dir / "config.json").write_text(json.dumps(saved))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(
        {"kind": "epoch", "epoch": e, "test_acc": 0.9, "test_loss": 0.3, "train_loss": 0.1,
         "wall_time": 2.0 * e}) + "\n" for e in range(1, epochs + 1)))


def test_a_run_is_finished_only_with_its_config_and_every_epoch(tmp_path):
    config = TrainConfig(method="ddg", stages=2, epochs=3, out=str(tmp_path / "a"),
                         executor="reference", threads=1, progress=False)
    write_run(tmp_path / "a", config, epochs=3)
    outcome = read_outcome(config)
    assert outcome["status"] == "finished" and outcome["test_acc"] == 0.9
    assert read_outcome(dataclasses.replace(config, lr=0.05)) is None  # other settings
    assert read_outcome(dataclasses.replace(config, epochs=4)) is None  # not all epochs
    assert read_outcome(dataclasses.replace(config, progress=True)) is not None  # cosmetic
    (tmp_path / "a" / DIVERGED_FILE).write_text(json.dumps({"error": "loss is nan"}))
    assert read_outcome(config)["status"] == "diverged"


def test_a_diverged_run_is_an_outcome_not_a_failure(tmp_path):
    config = TrainConfig(model="mlp", method="ddg", stages=2, epochs=1, lr=1e8,
                         weight_decay=0.0, out=str(tmp_path / "run"), executor="reference",
                         threads=1, progress=False)
    _train_one(config)
    outcome = read_outcome(config)
    assert outcome["status"] == "diverged" and outcome["test_acc"] is None
    assert "training diverged" in outcome["error"]
    assert read_outcome(dataclasses.replace(config, lr=1e7)) is None
