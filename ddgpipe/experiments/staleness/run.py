"""Run the staleness grid (skipping finished runs) and write its report from the runs' files."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ddgpipe.experiments.common import machines_line, read_outcome, run_grid
from ddgpipe.experiments.staleness.plan import StalenessPlan, plan_record
from ddgpipe.experiments.staleness.report import make_figures, render_report
from ddgpipe.experiments.staleness.summary import summarise
from ddgpipe.training.validation import check_config

__all__ = ["run_staleness"]


def run_staleness(plan: StalenessPlan, out: str | Path, progress: bool = True,
                  report_only: bool = False) -> dict:
    """Train the grid (skipping finished runs), then write ``summary.json``, ``results.md``
    and the figures, all from the runs' files.

    ``report_only`` trains nothing: the report covers the runs finished so far and names the
    missing ones, so a grid too long for one sitting can be read (and committed) part-way."""
    plan.validate()
    out = Path(out)
    runs = plan.runs(out)
    for run in runs:  # a bad combination fails here, in one line, not in a worker
        check_config(run.config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan_record(plan), indent=2) + "\n")
    start = time.perf_counter()
    if report_only:
        found = [(run, read_outcome(run.config)) for run in runs]
        missing = [run.name for run, outcome in found if outcome is None]
        runs, outcomes = [run for run, o in found if o], [o for _, o in found if o]
    else:
        outcomes, missing = run_grid([r.config for r in runs], out, plan.workers, progress), []
    for run, outcome in zip(runs, outcomes, strict=True):
        outcome.update(name=run.name, benchmark=run.benchmark, variant=run.variant.name,
                       seed=run.seed)
    summary = summarise(outcomes, plan)
    summary["missing"] = missing
    for row in summary["rows"]:
        prefix = f"{row['benchmark']}/{row['variant']}/k{row['stages']}-"
        row["missing"] = sum(name.startswith(prefix) for name in missing)
    summary["wall_time_s"] = time.perf_counter() - start
    summary["runs"] = len(runs)
    summary["train_time_s"] = sum(o["train_time_s"] or 0.0 for o in outcomes)
    summary["machines"] = machines_line(outcomes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    figures = make_figures(summary, plan, runs, out)
    (out / "results.md").write_text(render_report(summary, plan, figures, out))
    return summary
