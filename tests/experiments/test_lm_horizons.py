"""The language-model horizon study: its plan and folders, the best backprop rate, the
iso-loss step ratio, the report, the wall-clock arithmetic, and the quick grid end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddgpipe.cli import main
from ddgpipe.experiments.common import microbatching_available, read_outcome
from ddgpipe.experiments.lm.curves import mean_curve, steps_to_reach
from ddgpipe.experiments.lm.plan import LMPlan, lm_plan
from ddgpipe.experiments.lm.report import render_report
from ddgpipe.experiments.lm.summary import best_backprop, find, summarise
from ddgpipe.experiments.lm.variants import VARIANTS_BY_NAME
from ddgpipe.experiments.lm.wallclock import combine, ddg_bench_row
from ddgpipe.training.validation import check_config

DOCS_LM = Path(__file__).resolve().parents[2] / "docs" / "lm"
needs_microbatches = pytest.mark.skipif(not microbatching_available(),
                                        reason="microbatched DDG is not in this ddgpipe")


def _plan(**kwargs) -> LMPlan:
    settings = dict(variants=("bp", "bp-lr2", "ddg", "bp-asyncpp", "asyncpp"),
                    long_variants=("bp", "bp-lr2", "ddg"))
    return LMPlan(**(settings | kwargs))


def test_horizon_plan_folders_seeds_and_settings():
    plan = _plan()
    runs = {r.name: r for r in plan.runs("out", {800: 2.0, 3200: 0.5, 12800: None})}
    # 800 at the top (the committed runs' layout), the others in hH/; 3200 trains seed 0
    # only, 12800 seeds 0 and 1, and its tuned runs wait for its sweep
    assert {"bp/k1-s2", "bp-lr2/k1-s0", "ddg-lr2/k4-s1", "asyncpp/k8-s2",
            "h3200/ddg-lr0.5/k2-s0", "h12800/bp-lr2/k1-s1"} <= set(runs)
    assert not any(n.startswith("h3200/") and n.endswith("-s1") for n in runs)
    assert not any(n.startswith("h12800/ddg") or "asyncpp" in n and n.startswith("h12800")
                   for n in runs)
    assert len([n for n in runs if n.startswith("h12800/")]) == 4
    config = runs["h3200/ddg-lr0.5/k2-s0"].config
    assert (config.iterations, config.warmup_iters, config.eval_every, config.lr,
            config.stages) == (3200, 320, 100, 5e-4, 2)
    bp = runs["bp-lr2/k1-s0"].config
    assert (bp.iterations, bp.warmup_iters, bp.lr, bp.method) == (800, 80, 2e-3, "bp")
    # AsyncPP keeps its own recipe: NAdam at 3e-4, a warm-up share instead of iterations
    asyncpp = runs["asyncpp/k2-s0"].config
    assert (asyncpp.optimizer, asyncpp.lr, asyncpp.warmup_iters, asyncpp.warmup_share,
            asyncpp.beta1) == ("nadam", 3e-4, 0, 0.06, 0.99)
    # a rate of 1x keeps the bare folder, so DDG runs at the recipe's rate are reused
    assert "ddg/k2-s0" in {r.name for r in plan.runs("out", {800: 1.0})}


def test_variant_stage_lists_and_bench_rows():
    plan = LMPlan()
    assert plan.stages_of(VARIANTS_BY_NAME["ddg-m2"]) == [2]
    assert plan.stages_of(VARIANTS_BY_NAME["ddg-m4"]) == [2, 4, 8]
    assert plan.stages_of(VARIANTS_BY_NAME["ddg-m8"]) == [4, 8]
    assert plan.stages_of(VARIANTS_BY_NAME["bp-lr4"]) == [1]
    assert ddg_bench_row("ddg-m4") == "ddg-m4" and ddg_bench_row("ddg") == "ddg-graph-threads"
    # a variant's compensation is timed with it: its bench row carries it as ROW+COMP
    assert ddg_bench_row("ddg-m4+wp") == ddg_bench_row("ddg-m4-lr4+wp") == "ddg-m4+wp"
    assert ddg_bench_row("ddg+wp") == "ddg-graph-threads+wp"


def test_committed_runs_are_recognised_as_finished():
    """The backprop sweep already in docs/lm (800 and 3200 iterations) is not retrained."""
    plan = _plan(variants=("bp-lr0.5", "bp", "bp-lr2"), horizons=(800, 3200))
    runs = plan.runs(DOCS_LM, {}, bp_only=True)
    assert {r.name for r in runs} == {f"{v}/k1-s{s}" for v in ("bp-lr0.5", "bp", "bp-lr2")
                                      for s in (0, 1, 2)} | {
        f"h3200/{v}/k1-s0" for v in ("bp-lr0.5", "bp", "bp-lr2")}
    assert all(read_outcome(r.config) is not None for r in runs)


@pytest.mark.parametrize("variants, long_variants, message", [
    (("ddg",), ("bp",), "no backprop rate"),
    (("bp", "asyncpp"), ("bp",), "measured against bp-asyncpp"),
    (("bp",), ("bp", "nope"), "--long-variants: unknown variant 'nope'"),
])
def test_plan_refuses_what_it_cannot_measure(variants, long_variants, message):
    from ddgpipe.errors import UsageError

    with pytest.raises(UsageError, match=message):
        LMPlan(variants=variants, long_variants=long_variants).validate()


def _outcome(variant, horizon, seed, loss, stages=1, status="finished"):
    return {"variant": variant, "horizon": horizon, "seed": seed, "stages": stages,
            "status": status, "val_loss": loss, "val_bits_per_byte": loss * 2,
            "train_time_s": 1.0, "name": f"{variant}/k{stages}-s{seed}", "lr": None}


def test_best_backprop_rate_compares_like_with_like():
    runs = [_outcome("bp", 800, s, x) for s, x in ((0, 2.0), (1, 2.2), (2, 2.1))]
    runs += [_outcome("bp-lr2", 800, 0, 1.95)]  # one seed: compared on seed 0 only
    runs += [_outcome("bp-lr4", 800, s, 1.5, status="finished" if s else "diverged")
             for s in (0, 1)]  # a diverged seed rules the rate out
    runs += [_outcome("bp-asyncpp", 800, 0, 1.0)]  # not an AdamW rate
    best = best_backprop(runs, 800)
    assert best == {"variant": "bp-lr2", "lr": 2e-3, "multiple": 2.0, "seeds": [0],
                    "val_loss_mean": 1.95, "rates": ["bp", "bp-lr2"]}
    assert best_backprop(runs, 3200) is None


def test_iso_loss_steps_on_synthetic_curves():
    curve = ([100, 200, 300, 400], [3.0, 2.5, 2.0, 1.75])
    assert steps_to_reach(curve, 2.25) == 250.0  # halfway between 2.5 at 200 and 2.0 at 300
    assert steps_to_reach(curve, 2.0) == 300.0
    assert steps_to_reach(curve, 1.875) == 350.0
    assert steps_to_reach(curve, 3.5) == 100.0  # already there at the first eval
    assert steps_to_reach(curve, 1.5) is None  # never
    assert mean_curve([([100, 200], [3.0, 2.0]), ([100, 200, 300], [2.0, 1.0, 0.5])]) == (
        [100, 200], [2.5, 1.5])


def _synthetic_summary(plan: LMPlan) -> dict:
    runs = [_outcome("bp", 800, 0, 2.0), _outcome("bp-lr2", 800, 0, 1.75),
            _outcome("ddg", 800, 0, 1.875, stages=2), _outcome("ddg", 800, 0, 2.5, stages=4)]
    curves = {(800, "bp-lr2", 1): ([400, 800], [2.25, 1.75]),
              (800, "ddg", 2): ([400, 800], [2.0, 1.5]),  # reaches 1.75 at 600: x0.75
              (800, "ddg", 4): ([400, 800], [3.0, 2.5])}  # never reaches 1.75
    return summarise(runs, plan, curves)


def test_summary_gaps_iso_ratios_and_goal():
    plan = _plan(variants=("bp", "bp-lr2", "ddg"), horizons=(800,), stage_counts=(2, 4))
    summary = _synthetic_summary(plan)
    rows = summary["rows"]
    k2, k4 = find(rows, 800, "ddg", 2), find(rows, 800, "ddg", 4)
    assert summary["best_bp"]["800"]["variant"] == "bp-lr2"
    assert k2["gap_to_best_bp_pct"] == pytest.approx(100 * 0.125 / 1.75)
    assert (k2["iso_steps"], k2["iso_ratio"], k2["target_reached"]) == (600.0, 0.75, True)
    assert (k4["iso_steps"], k4["target_reached"]) == (None, False)
    goal = summary["goal"]
    assert goal["recommended"] == "ddg" and goal["met"] is False
    assert goal["recommended_worst_gap_pct"] == pytest.approx(100 * 0.75 / 1.75)


def test_report_renders_cells_goal_and_seeds():
    plan = _plan(variants=("bp", "bp-lr2", "ddg"), horizons=(800,), stage_counts=(2, 4))
    summary = _synthetic_summary(plan) | {"missing": [], "waiting_for_sweep": []}
    wallclock = {"variant": "ddg", "horizon": 800, "ddg_row": "ddg-graph-threads",
                 "batch_size": 16, "bench_steps": 20, "bench_rounds": 3,
                 "rows": combine([{"name": "bp-2t", "images_per_s": 32.0},
                                  {"name": "ddg-graph-threads", "images_per_s": 64.0}],
                                 800, "ddg-graph-threads", 600.0, 16)}
    text = render_report(summary, plan, [Path("gap-horizon.png")], wallclock)
    assert "| DDG (tuned lr) | | 1.875 (1 seed) (+7.1%), x0.75 steps | 2.500 (1 seed) " \
           "(+42.9%), not reached |" in text
    assert "| 800 | BP 2.000, BP lr x2 1.750 | bp-lr2 (1.750 over seeds 0) | 0.002 |" in text
    assert "**ddg**" in text and "missed by 41.86 percentage points" in text
    assert "| ddg-graph-threads: DDG, threaded executor, one thread per stage | 64.0 | " \
           "0.250 | 600 | 150 | 0.38 |" in text
    assert "![gap-horizon](gap-horizon.png)" in text
    assert "Cells resting on fewer seeds than planned: 800 BP K = 1 (1)" in text


def test_wallclock_combines_bench_speed_with_study_steps():
    rows = [{"name": "bp-1t", "images_per_s": 16.0}, {"name": "bp-2t", "images_per_s": 32.0},
            {"name": "gpipe-m4", "images_per_s": 40.0},
            {"name": "ddg-m4", "images_per_s": 64.0},
            {"name": "1f1b-m2", "images_per_s": None, "error": "boom"}]
    table = {r["name"]: r for r in combine(rows, 800, "ddg-m4", 1000.0, 16)}
    assert set(table) == {"bp-2t", "gpipe-m4", "ddg-m4", "1f1b-m2"}  # no one-thread row
    assert (table["bp-2t"]["step_s"], table["bp-2t"]["time_s"]) == (0.5, 400.0)
    assert (table["gpipe-m4"]["time_s"], table["gpipe-m4"]["vs_bp_2t"]) == (320.0, 0.8)
    assert (table["ddg-m4"]["steps"], table["ddg-m4"]["time_s"]) == (1000.0, 250.0)
    assert table["gpipe-m4"]["what"] == "GPipe (torch.distributed.pipelining), 4 microbatches"
    assert table["1f1b-m2"]["time_s"] is None and table["1f1b-m2"]["error"] == "boom"
    assert combine(rows, 800, "ddg-m4", None, 16)[2]["time_s"] is None  # not reached
    wp = [{"name": "ddg-m4+wp", "images_per_s": 32.0},
          {"name": "ddg-graph-threads+wp", "images_per_s": 32.0}]
    assert [r["what"] for r in combine(wp, 800, "ddg-m4+wp", 1000.0, 16)] == [
        "microbatched DDG, 4 microbatches, + wp",
        "DDG, threaded executor, one thread per stage, + wp"]


@needs_microbatches
def test_microbatched_variants_build_their_configs():
    runs = {r.name: r for r in LMPlan(horizons=(800,)).runs("out", {800: 2.0})}
    assert runs["ddg-m4-lr2/k2-s0"].config.microbatches == 4
    assert runs["ddg-m8-lr2/k8-s0"].config.microbatches == 8
    assert runs["asyncpp-m4/k4-s0"].config.lr == 3e-4
    assert "ddg-m8-lr2/k2-s0" not in runs and "ddg-m2-lr2/k4-s0" not in runs
    for run in runs.values():
        check_config(run.config)


@pytest.mark.slow
def test_quick_horizon_study_its_phases_and_resumption(tmp_path, capsys):
    out = tmp_path / "lm"
    argv = ["experiment", "lm", "--quick", "--out", str(out), "--variants", "bp,bp-lr2,ddg"]
    assert main([*argv, "--report-only"]) == 0  # nothing trained: the sweep is unfinished
    assert "not yet (sweep unfinished)" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    best = plan["resolved_lr"]["12"]
    folder = "ddg" if best["multiple"] == 1 else f"ddg-lr{best['multiple']:g}"
    config = json.loads((out / folder / "k2-s0" / "config.json").read_text())
    assert config["lr"] == best["lr"] and config["iterations"] == 12
    assert json.loads((out / "h24/bp/k1-s0/config.json").read_text())["iterations"] == 24
    assert err.count(" val loss ") == 6 and "tuned variants train at lr" in err
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["horizon"], r["variant"], r["stages"]) for r in summary["rows"]} == {
        (h, v, k) for h in (12, 24) for v, k in (("bp", 1), ("bp-lr2", 1), ("ddg", 2))}
    for png in ("gap-horizon.png", "loss-h12.png", "loss-h24.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    before = (out / "h24/bp/k1-s0/metrics.jsonl").stat().st_mtime_ns
    assert main(argv) == 0  # everything finished: nothing is trained again
    assert (out / "h24/bp/k1-s0/metrics.jsonl").stat().st_mtime_ns == before
    assert "6 of 6 runs already finished" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--horizons", "800,800"], "--horizons needs distinct values"),
    (["--long-variants", "bp,ddg-nope"], "unknown variant 'ddg-nope'"),
    (["--recommended", "ddg"], "--recommended names the DDG variant --wallclock times"),
    (["--seed-counts", "3200-1"], "--seed-counts takes HORIZON:SEEDS pairs"),
    (["--seed-counts", "12:0"], "every horizon needs at least one seed"),
])
def test_bad_lm_input(argv, message, capsys, tmp_path):
    assert main(["experiment", "lm", "--quick", "--report-only", "--out", str(tmp_path),
                 *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_quick_plan_is_small():
    plan = lm_plan(quick=True)
    plan.validate()
    assert plan.horizons == (12, 24) and plan.variants_at(24) == ("bp", "bp-lr2", "ddg")


def test_plan_cost_counts_runs_left_and_their_core_minutes(tmp_path):
    from ddgpipe.experiments.lm.run import format_plan_cost, plan_cost

    plan = _plan(variants=("bp", "bp-lr2", "ddg"), long_variants=("bp", "bp-lr2"))
    table = plan_cost(plan, tmp_path)  # nothing trained: every run is left
    assert [(r["horizon"], r["seeds"], r["runs"], r["left"]) for r in table] == [
        (800, 3, 15, 15), (3200, 1, 5, 5), (12800, 2, 4, 4)]
    assert [r["core_minutes_left"] for r in table] == [105.0, 140.0, 448.0]
    assert format_plan_cost(table, 2).endswith("left: 693 core-minutes, about 5.8 hours with "
                                               "2 workers")


def test_wallclock_times_the_recommended_variant_or_the_one_named():
    from ddgpipe.errors import UsageError
    from ddgpipe.experiments.lm.wallclock import choose_variant

    plan = _plan(variants=("bp", "bp-lr2", "ddg"), horizons=(800,), stage_counts=(2, 4))
    summary = _synthetic_summary(plan)
    name, row = choose_variant(summary, None)
    assert (name, row["horizon"], row["iso_steps"]) == ("ddg", 800, 600.0)
    with pytest.raises(UsageError, match="not a DDG variant"):
        choose_variant(summary, "bp-lr2")
    with pytest.raises(UsageError, match="no finished run at K = 2"):
        choose_variant(summary, "ddg+wp")


def test_a_bench_timed_with_the_same_settings_is_reused(tmp_path):
    from ddgpipe.experiments.lm.wallclock import bench_settings, saved_bench

    settings = bench_settings(lm_plan(quick=True), "ddg-graph-threads")
    assert settings["configs"] == ["bp-2t", "ddp", "gpipe-m2", "gpipe-m4", "1f1b-m2",
                                   "1f1b-m4", "ddg-graph-threads"]
    assert saved_bench(tmp_path, settings) is None
    result = {"config": settings | {"seed": 0}, "rows": []}
    (tmp_path / "bench.json").write_text(json.dumps(result))
    assert saved_bench(tmp_path, settings) == result
    assert saved_bench(tmp_path, settings | {"steps": 30}) is None
    # a bench timed before the optimizer setting (momentum SGD) is not reused for AdamW
    sgd = {"config": {k: v for k, v in settings.items() if k != "optimizer"}, "rows": []}
    (tmp_path / "bench.json").write_text(json.dumps(sgd))
    assert saved_bench(tmp_path, settings) is None


def test_the_wallclock_bench_times_the_studys_optimizer_and_compensation(tmp_path):
    from ddgpipe.bench import BenchConfig
    from ddgpipe.bench.config import resolve
    from ddgpipe.experiments.lm.wallclock import bench_settings, write_wallclock

    plan = lm_plan(quick=True)
    settings = bench_settings(plan, ddg_bench_row("ddg-m4-lr4+wp"))
    assert settings["optimizer"] == plan.recipe["optimizer"] == "adamw"
    assert settings["configs"][-1] == "ddg-m4+wp"
    config = BenchConfig(**(settings | {"microbatches": tuple(settings["microbatches"]),
                                        "configs": tuple(settings["configs"])}))
    ddg = resolve(config)[-1]  # as the command line builds it: wp with AdamW is accepted
    assert (ddg.name, ddg.kind, ddg.microbatches, ddg.compensation) == (
        "ddg-m4+wp", "ddg", 4, "wp")
    record = write_wallclock("ddg-m4-lr4+wp", {"horizon": 12, "iso_steps": 10.0}, settings,
                             {"rows": [{"name": "ddg-m4+wp", "images_per_s": 8.0}]}, tmp_path)
    assert (record["ddg_row"], record["bench_optimizer"]) == ("ddg-m4+wp", "adamw")
    assert record["rows"][0]["what"] == "microbatched DDG, 4 microbatches, + wp"


def test_ddgs_own_rates_are_tabled_with_the_best_per_k():
    plan = _plan(variants=("bp", "ddg-m4-lr1", "ddg-m4-lr2", "ddg-m4-lr4"), horizons=(800,),
                 stage_counts=(2, 4))
    runs = [_outcome("bp", 800, 0, 2.0), _outcome("ddg-m4-lr1", 800, 0, 2.5, stages=2),
            _outcome("ddg-m4-lr2", 800, 0, 2.25, stages=2),
            _outcome("ddg-m4-lr4", 800, 0, 2.375, stages=2),
            _outcome("ddg-m4-lr2", 800, 0, 3.0, stages=4),
            _outcome("ddg-m4-lr4", 800, 0, 2.75, stages=4)]
    for run in runs:  # the rate each run's config records
        run["lr"] = VARIANTS_BY_NAME[run["variant"]].changes.get("lr", 1e-3)
    summary = summarise(runs, plan, {}) | {"missing": [], "waiting_for_sweep": []}
    text = render_report(summary, plan, [])
    assert "| variant | K | 0.001 | 0.002 | 0.004 | best |" in text
    assert "| DDG M=4 | 2 | 2.500 (+25.0%) | 2.250 (+12.5%) | 2.375 (+18.8%) | 0.002 |" in text
    assert "| DDG M=4 | 4 | – | 3.000 (+50.0%) | 2.750 (+37.5%) | 0.004 |" in text


def test_weight_prediction_at_own_rates_is_a_family_of_its_own():
    plan = _plan(variants=("bp", "ddg-m4-lr2", "ddg-m4-lr2+wp", "ddg-m4-lr4+wp"),
                 horizons=(800,), stage_counts=(2,))
    runs = [_outcome("bp", 800, 0, 2.0), _outcome("ddg-m4-lr2", 800, 0, 2.5, stages=2),
            _outcome("ddg-m4-lr2+wp", 800, 0, 2.25, stages=2),
            _outcome("ddg-m4-lr4+wp", 800, 0, 2.125, stages=2)]
    for run in runs:
        run["lr"] = VARIANTS_BY_NAME[run["variant"]].changes.get("lr", 1e-3)
    summary = summarise(runs, plan, {}) | {"missing": [], "waiting_for_sweep": []}
    text = render_report(summary, plan, [])
    assert "| DDG M=4 + wp | 2 | 2.250 (+12.5%) | 2.125 (+6.2%) | 0.004 |" in text
    assert "| DDG M=4 | 2 |" not in text  # one rate only: no row of its own


def test_the_help_names_the_plans_own_long_variants(capsys):
    from ddgpipe.cli.main import build_parser
    from ddgpipe.experiments.lm.plan import DEFAULT_LONG_VARIANTS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["experiment", "lm", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ",".join(DEFAULT_LONG_VARIANTS) in help_text.replace(", ", ",").replace("- ", "-")


def test_the_goal_is_judged_on_each_ks_closest_variant_when_none_ran_at_every_k():
    plan = _plan(variants=("bp", "ddg-m4-lr4+wp", "ddg-m8-lr2+wp"), horizons=(800,),
                 stage_counts=(2, 4))
    runs = [_outcome("bp", 800, 0, 2.0), _outcome("ddg-m4-lr4+wp", 800, 0, 2.01, stages=2),
            _outcome("ddg-m8-lr2+wp", 800, 0, 2.1, stages=4)]
    summary = summarise(runs, plan, {}) | {"missing": [], "waiting_for_sweep": []}
    text = render_report(summary, plan, [])
    assert "K = 2: ddg-m4-lr4+wp +0.50%; K = 4: ddg-m8-lr2+wp +5.00%" in text
    assert ("with each K's closest variant the worst gap is +5.00%: the goal is missed by "
            "4.00 percentage points (at K = 4)") in text
