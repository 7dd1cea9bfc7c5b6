"""Run the language-model study in two phases (backprop's learning-rate sweep, then every
other run at the best rate found), skipping finished runs, and write its report from the
runs' own files."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ddgpipe.experiments.common import machines_line, read_outcome, run_grid
from ddgpipe.experiments.lm.curves import Curve, mean_curve, read_curve
from ddgpipe.experiments.lm.figures import make_figures
from ddgpipe.experiments.lm.plan import GridRun, LMPlan, plan_record
from ddgpipe.experiments.lm.report import render_report
from ddgpipe.experiments.lm.summary import best_backprop, summarise
from ddgpipe.training.validation import check_config

__all__ = ["run_lm", "resolve_rates", "plan_cost", "format_plan_cost"]


def _outcomes(runs: list[GridRun]) -> tuple[list[dict], list[str]]:
    """The finished runs' outcomes, labelled with their cell, and the missing runs' names."""
    found, missing = [], []
    for run in runs:
        outcome = read_outcome(run.config)
        if outcome is None:
            missing.append(run.name)
            continue
        found.append(outcome | {"name": run.name, "variant": run.variant.name,
                                "horizon": run.horizon, "seed": run.seed,
                                "lr": run.config.lr})
    return found, missing


def resolve_rates(plan: LMPlan, out: Path) -> dict[int, dict | None]:
    """Each horizon's best AdamW backprop rate, from its finished sweep runs (None: none)."""
    outcomes, _ = _outcomes(plan.runs(out, {}, bp_only=True))
    return {h: best_backprop(outcomes, h) for h in plan.horizons}


def _multiples(resolved: dict[int, dict | None]) -> dict[int, float | None]:
    return {h: best["multiple"] if best else None for h, best in resolved.items()}


def run_lm(plan: LMPlan, out: str | Path, progress: bool = True,
           report_only: bool = False) -> dict:
    """Train the sweep, resolve each horizon's rate, train the rest; write ``plan.json``,
    ``summary.json``, ``results.md`` and the figures.

    ``report_only`` trains nothing: the report covers the runs finished so far, names the
    missing ones, and counts the runs that wait for their horizon's sweep."""
    plan.validate()
    out = Path(out)
    start = time.perf_counter()
    bp_runs = plan.runs(out, {}, bp_only=True)
    for run in bp_runs:  # a bad combination fails here, in one line, not in a worker
        check_config(run.config)
    out.mkdir(parents=True, exist_ok=True)
    if not report_only:
        run_grid([r.config for r in bp_runs], out, plan.workers, progress)
    resolved = resolve_rates(plan, out)
    _write_plan(plan, resolved, out)
    runs = plan.runs(out, _multiples(resolved))
    for run in runs:
        check_config(run.config)
    if not report_only:
        if progress:
            _log_rates(resolved)
        run_grid([r.config for r in runs], out, plan.workers, progress)
    return write_report(plan, runs, resolved, out, time.perf_counter() - start)


def _write_plan(plan: LMPlan, resolved: dict[int, dict | None], out: Path) -> None:
    record = plan_record(plan, {str(h): b for h, b in resolved.items()})
    record["estimated_core_minutes"] = plan.estimated_core_minutes(
        plan.runs(out, _multiples(resolved)))
    (out / "plan.json").write_text(json.dumps(record, indent=2) + "\n")


def _log_rates(resolved: dict[int, dict | None]) -> None:
    for horizon, best in resolved.items():
        if best:
            print(f"{horizon} iterations: the tuned variants train at lr {best['lr']:g} "
                  f"({best['variant']}, the best backprop over seeds "
                  f"{', '.join(map(str, best['seeds']))})", file=sys.stderr, flush=True)


def write_report(plan: LMPlan, runs: list[GridRun], resolved: dict[int, dict | None],
                 out: Path, wall_time_s: float = 0.0) -> dict:
    """``summary.json``, ``results.md`` and the figures from the runs finished in ``out``."""
    outcomes, missing = _outcomes(runs)
    waiting = [h for h, best in resolved.items() if best is None]
    curves = cell_curves(outcomes)
    summary = summarise(outcomes, plan, curves)
    summary.update(missing=missing, waiting_for_sweep=waiting, runs=len(runs),
                   wall_time_s=wall_time_s, machines=machines_line(outcomes),
                   train_time_s=sum(o["train_time_s"] or 0.0 for o in outcomes))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    figures = make_figures(plan, summary, curves, out)
    timed = out / "wallclock.json"
    wallclock = json.loads(timed.read_text()) if timed.exists() else None
    (out / "results.md").write_text(render_report(summary, plan, figures, wallclock))
    return summary


def cell_curves(outcomes: list[dict]) -> dict[tuple[int, str, int], Curve]:
    """Each cell's held-out loss curve, the mean over its finished seeds."""
    by_cell: dict[tuple[int, str, int], list[Curve]] = {}
    for o in outcomes:
        if o["status"] == "finished":
            by_cell.setdefault((o["horizon"], o["variant"], o["stages"]), []).append(
                read_curve(o["out"]))
    return {cell: mean_curve(curves) for cell, curves in by_cell.items()}


def plan_cost(plan: LMPlan, out: str | Path) -> list[dict]:
    """Per horizon: the runs planned, finished and left, and what those left cost on one core
    (roughly). Tuned runs of a horizon whose sweep is unfinished all count as left."""
    plan.validate()
    out = Path(out)
    resolved = resolve_rates(plan, out)
    waiting = {h: 1.0 for h, best in resolved.items() if best is None}  # a stand-in rate
    multiples: dict[int, float | None] = {**_multiples(resolved), **waiting}
    runs = plan.runs(out, multiples)
    table = []
    for horizon in sorted(plan.horizons):
        here = [r for r in runs if r.horizon == horizon]
        left = [r for r in here if (r.variant.tuned and horizon in waiting)
                or read_outcome(r.config) is None]
        table.append({"horizon": horizon, "seeds": len(plan.seeds_at(horizon)),
                      "runs": len(here), "finished": len(here) - len(left),
                      "left": len(left), "core_minutes_left": plan.estimated_core_minutes(left),
                      "core_minutes": plan.estimated_core_minutes(here)})
    return table


def format_plan_cost(table: list[dict], workers: int) -> str:
    """``--plan-only``'s table: per horizon, runs and core-minutes left."""
    lines = ["horizon  seeds  runs  finished  left  core-min left  (all)"]
    lines += [f"{r['horizon']:>7}  {r['seeds']:>5}  {r['runs']:>4}  {r['finished']:>8}  "
              f"{r['left']:>4}  {r['core_minutes_left']:>13.0f}  ({r['core_minutes']:.0f})"
              for r in table]
    left = sum(r["core_minutes_left"] for r in table)
    return "\n".join(lines + [f"left: {left:.0f} core-minutes, about {left / 60 / workers:.1f} "
                               f"hours with {workers} workers"])
