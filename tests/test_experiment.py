"""The paper experiment's quick variant end to end, and its summary arithmetic."""

from __future__ import annotations

import json

import pytest

from ddgpipe.cli import main
from ddgpipe.experiment import ExperimentPlan, summarise_runs


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
