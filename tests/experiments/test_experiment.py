"""The experiments' quick variants end to end, resuming a grid, and their arithmetic."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ddgpipe.cli import main
from ddgpipe.data.mnist1d import CACHE_ENV
from ddgpipe.experiments.common import (
    DIVERGED_FILE,
    _train_one,
    microbatching_available,
    read_outcome,
)
from ddgpipe.experiments.paper import ExperimentPlan, summarise_runs
from ddgpipe.experiments.staleness.plan import StalenessPlan
from ddgpipe.experiments.staleness.summary import summarise
from ddgpipe.training import TrainConfig


@pytest.mark.slow
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


# ---- experiment staleness ------------------------------------------------------------------


@pytest.mark.slow
def test_quick_staleness_experiment_and_its_resumption(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # mnist1d generated here, once
    out = tmp_path / "stale"
    assert main(["experiment", "staleness", "--quick", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "[20/20]" in captured.err  # one progress line per run
    summary = json.loads((out / "summary.json").read_text())
    got = {(r["benchmark"], r["variant"], r["stages"]) for r in summary["rows"]}
    for bench in ("digits", "mnist1d"):
        assert (bench, "bp", 1) in got and (bench, "bp-2x", 1) in got
        for variant in ("ddg", "ddg+sc+lwp", "ddg-lr0.025", "ddg-2x"):
            assert {(bench, variant, 2), (bench, variant, 4)} <= got
    assert len(summary["rows"]) == 20  # one seed: a row per run
    for row in summary["rows"]:
        assert 0 <= row["test_acc_mean"] <= 100 and row["seeds"] == 1
        if row["method"] != "bp":
            bp = next(r for r in summary["rows"] if r["benchmark"] == row["benchmark"]
                      and r["variant"] == row["baseline"])
            assert row["gap_to_bp_pp"] == pytest.approx(row["test_acc_mean"]
                                                        - bp["test_acc_mean"])
    assert {(g["benchmark"], g["variant"]) for g in summary["goals"]} == {
        (b, v) for b in ("digits", "mnist1d") for v in ("ddg", "ddg+sc+lwp")}
    assert all(len(g["per_k"]) == 2 and g["met"] in (True, False) for g in summary["goals"])
    assert len(summary["sweep"]) == 4 and len(summary["budget"]) == 6
    report = (out / "results.md").read_text()
    assert report in captured.out
    for heading in ("## Goals", "## digits: resnet20", "## mnist1d: resnet1d-20",
                    "## Plain DDG's learning-rate sweep", "## Budget"):
        assert heading in report
    assert "| digits | DDG + sc,lwp |" in report
    for png in ("loss-digits.png", "seeds-mnist1d.png", "budget-digits.png",
                "accuracy-vs-k.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "mnist1d/ddg+sc+lwp/k4-s0/config.json").read_text())
    assert (config["executor"], config["threads"], config["compensation"]) == (
        "reference", 1, "sc,lwp")

    # A run that stopped halfway is missing from a report-only report, which trains nothing
    metrics = out / "digits/ddg/k4-s0/metrics.jsonl"
    metrics.write_text("")
    assert main(["experiment", "staleness", "--quick", "--report-only", "--out",
                 str(out)]) == 0
    assert "[1/" not in capsys.readouterr().err and metrics.read_text() == ""
    partial = json.loads((out / "summary.json").read_text())
    assert partial["missing"] == ["digits/ddg/k4-s0"] and partial["runs"] == 19
    assert ("digits", "ddg", 4) not in {(r["benchmark"], r["variant"], r["stages"])
                                        for r in partial["rows"]}
    report = (out / "results.md").read_text()
    assert "This report covers 19 of the plan's 20 runs" in report
    assert "Not trained yet: `digits/ddg/k4-s0`" in report

    # ... and trained again by the same command without it; the finished ones are skipped.
    (out / "results.md").unlink()
    assert main(["experiment", "staleness", "--quick", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "19 of 20 runs already finished" in err
    assert "[1/1] digits/ddg/k4-s0" in err and "[2/" not in err
    assert (out / "results.md").exists() and metrics.read_text()


def write_run(run_dir: Path, config: TrainConfig, epochs: int) -> None:
    run_dir.mkdir(parents=True)
    saved = dataclasses.asdict(config) | {"label": "DDG K=2", "split": [3], "num_blocks": 11}
    (run_dir / "config.json").write_text(json.dumps(saved))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(
        {"kind": "epoch", "epoch": e, "test_acc": 0.9, "test_loss": 0.3, "train_loss": 0.1,
         "wall_time": 2.0 * e}) + "\n" for e in range(1, epochs + 1)))


def test_a_run_is_finished_only_with_its_config_and_every_epoch(tmp_path):
    config = TrainConfig.from_flat(method="ddg", stages=2, epochs=3, out=str(tmp_path / "a"),
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
    config = TrainConfig.from_flat(model="mlp", method="ddg", stages=2, epochs=1, lr=1e8,
                                   weight_decay=0.0, out=str(tmp_path / "run"),
                                   executor="reference", threads=1, progress=False)
    _train_one(config)
    outcome = read_outcome(config)
    assert outcome["status"] == "diverged" and outcome["test_acc"] is None
    assert "training diverged" in outcome["error"]
    assert read_outcome(dataclasses.replace(config, lr=1e7)) is None


def fake_outcomes(accuracies: dict) -> list[dict]:
    """(variant, K) -> accuracies in % per seed (None: that seed diverged)."""
    outcomes = []
    for (variant, k), accs in accuracies.items():
        for seed, acc in enumerate(accs):
            outcomes.append({
                "benchmark": "digits", "variant": variant, "stages": k, "seed": seed,
                "name": f"digits/{variant}/k{k}-s{seed}",
                "status": "finished" if acc is not None else "diverged",
                "test_acc": None if acc is None else acc / 100,
                "train_loss": None if acc is None else (100 - acc) / 100})
    return outcomes


def test_default_budget_part_trains_k4_on_the_first_seed():
    runs = [r.name for r in StalenessPlan().runs("out") if "3x" in r.name]
    assert runs == ["digits/bp-3x/k1-s0", "digits/ddg-3x/k4-s0",
                    "mnist1d/bp-3x/k1-s0", "mnist1d/ddg-3x/k4-s0"]


def test_staleness_gaps_sweep_budget_and_goals_are_computed():
    plan = StalenessPlan(benchmarks=("digits",), stage_counts=(2, 8), seeds=(0, 1),
                         variants=("bp", "ddg", "ddg+sc", "ddg+lwp"), sweep_lrs=(0.05, 0.025),
                         budget_stages=(2, 8), budget_seeds=2)
    summary = summarise(fake_outcomes({
        ("bp", 1): [98.0, 96.0],                                  # BP: 97.0
        ("ddg", 2): [96.8, 96.8], ("ddg", 8): [95.5, 95.5],       # -0.2, -1.5
        ("ddg-lr0.025", 2): [96.9, 96.9], ("ddg-lr0.025", 8): [99.0, None],
        ("ddg+sc", 2): [97.0, 97.0], ("ddg+sc", 8): [96.5, 96.5],  # 0.0, -0.5: goals met
        ("ddg+lwp", 2): [96.85, 96.85], ("ddg+lwp", 8): [97.0, None],
        ("bp-3x", 1): [98.5, 98.5], ("ddg-3x", 2): [98.4, 98.4], ("ddg-3x", 8): [97.0, 97.0],
    }), plan)
    rows = {(r["variant"], r["stages"]): r for r in summary["rows"]}
    assert rows[("bp", 1)]["test_acc_mean"] == pytest.approx(97.0)
    assert rows[("bp", 1)]["test_acc_std"] == pytest.approx(2 ** 0.5)
    assert rows[("ddg", 8)]["gap_to_bp_pp"] == pytest.approx(-1.5)
    assert rows[("ddg-3x", 8)]["gap_to_bp_pp"] == pytest.approx(-1.5)  # to BP at 3x
    lwp8 = rows[("ddg+lwp", 8)]
    assert (lwp8["seeds"], lwp8["diverged"], lwp8["test_acc_mean"]) == (1, 1, 97.0)

    sweep = {s["stages"]: s for s in summary["sweep"]}
    assert sweep[2]["best_lr"] == 0.025 and sweep[2]["best_acc_mean"] == pytest.approx(96.9)
    assert sweep[8]["best_lr"] == 0.05  # 0.025 scored higher, but a seed diverged there

    budget = {(b["method"], b["stages"]): b for b in summary["budget"]}
    assert budget[("ddg", 2)]["gap_change_pp"] == pytest.approx(0.1)
    assert budget[("ddg", 8)]["gap_change_pp"] == pytest.approx(0.0)

    # on seed 0 alone, every column of the budget table is seed 0's, backprop's included
    one_seed = summarise(fake_outcomes({
        ("bp", 1): [98.0, 96.0], ("ddg", 2): [96.8, 90.0], ("ddg", 8): [95.5, 95.5],
        ("bp-3x", 1): [98.5], ("ddg-3x", 2): [98.4], ("ddg-3x", 8): [None],
    }), dataclasses.replace(plan, parts=("budget",), budget_seeds=1))
    budget = {(b["method"], b["stages"]): b for b in one_seed["budget"]}
    assert budget[("ddg", 2)]["short"]["gap_to_bp_pp"] == pytest.approx(-1.2)
    assert budget[("ddg", 2)]["long"]["gap_to_bp_pp"] == pytest.approx(-0.1)
    assert budget[("ddg", 2)]["gap_change_pp"] == pytest.approx(1.1)
    assert budget[("ddg", 8)]["long"]["diverged"] == 1
    assert budget[("ddg", 8)]["gap_change_pp"] is None

    goals = {g["variant"]: g for g in summary["goals"]}
    assert goals["ddg+sc"]["met"] is True
    ddg = {c["stages"]: c for c in goals["ddg"]["per_k"]}
    assert ddg[2]["within_bp"] is True and ddg[8]["within_bp"] is False
    assert ddg[2]["not_worse_than_tuned_ddg"] is False  # 96.8 < 96.9 at lr 0.025
    assert goals["ddg"]["met"] is False
    lwp = {c["stages"]: c for c in goals["ddg+lwp"]["per_k"]}
    assert lwp[2]["vs_tuned_ddg_pp"] == pytest.approx(-0.05)
    assert lwp[8]["within_bp"] is False  # its mean is fine, but a seed diverged
    assert summary["diverged"] == ["digits/ddg+lwp/k8-s1", "digits/ddg-lr0.025/k8-s1"]

    no_sweep = dataclasses.replace(plan, parts=("main",))
    summary = summarise(fake_outcomes({("bp", 1): [97.0], ("ddg+sc", 2): [97.0],
                                       ("ddg+sc", 8): [97.0], ("ddg", 2): [90.0],
                                       ("ddg", 8): [90.0], ("ddg+lwp", 2): [97.0],
                                       ("ddg+lwp", 8): [97.0]}), no_sweep)
    goals = {g["variant"]: g for g in summary["goals"]}
    assert goals["ddg+sc"]["met"] is None and goals["ddg"]["met"] is False


def test_staleness_microbatched_rows_count_only_at_their_k():
    plan = StalenessPlan(benchmarks=("digits",), stage_counts=(2, 4), seeds=(0,),
                         parts=("main",), variants=("bp", "ddg", "ddg-m4"))
    summary = summarise(fake_outcomes({("bp", 1): [97.0], ("ddg", 2): [96.0],
                                       ("ddg", 4): [95.0], ("ddg-m4", 4): [96.9]}), plan)
    goal = next(g for g in summary["goals"] if g["variant"] == "ddg-m4")
    assert [c.get("not_run", False) for c in goal["per_k"]] == [True, False]
    assert goal["per_k"][1]["within_bp"] is True
    assert goal["met"] is None  # no sweep part to compare with: n/a, K = 2 not counted


def test_staleness_default_variants_follow_microbatching():
    from ddgpipe.experiments.staleness.plan import default_variants

    micro = {"ddg-m4", "ddg-m8"} & set(default_variants())
    assert micro == ({"ddg-m4", "ddg-m8"} if microbatching_available() else set())


@pytest.mark.skipif(not microbatching_available(), reason="microbatched DDG is not merged")
def test_staleness_microbatched_runs_at_k4_and_8():
    plan = StalenessPlan(seeds=(0,), parts=("main",), variants=("bp", "ddg-m4", "ddg-m8"))
    plan.validate()
    runs = {r.name: r for r in plan.runs("out")}
    for bench in ("digits", "mnist1d"):
        assert {n for n in runs if n.startswith(f"{bench}/ddg-m")} == {
            f"{bench}/ddg-m{m}/k{k}-s0" for m in (4, 8) for k in (4, 8)}
    assert runs["digits/ddg-m8/k4-s0"].config.microbatches == 8


@pytest.mark.parametrize("argv, message", [
    (["--parts", "main,tuning"], "--parts takes a comma-separated subset of main,sweep,budget"),
    (["--benchmarks", "cifar10"], "--benchmarks takes a comma-separated subset of"),
    (["--stages", "1,2"], "--stages must all be >= 2"),
    (["--stages", "2,16"], "K = 16 does not fit resnet20 (digits): it has 11 blocks"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--seeds", "1,1"], "--seeds names a value twice"),
    (["--budget-seeds", "2"], "--budget-seeds must be between 1 and the number of seeds (1)"),
    (["--budget-stages", "1"], "--budget-stages must all be >= 2"),
])
def test_bad_staleness_input(argv, message, capsys, tmp_path):
    assert main(["experiment", "staleness", "--quick", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
