"""``results.md`` of the language-model horizon study, from ``summary.json``'s data."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ddgpipe.experiments.lm.summary import TOLERANCE_PCT, find, rows_at
from ddgpipe.experiments.lm.variants import BEST_BP, VARIANTS_BY_NAME

__all__ = ["render_report", "cell_text"]


def cell_text(row: dict | None) -> str:
    """A cell: mean held-out loss (± std, or the one seed), the gap to the best backprop, the
    iso-loss step ratio; ``–`` when nothing finished."""
    if row is None or row["val_loss_mean"] is None:
        return "–" if row is None or not row["diverged"] else f"{row['diverged']} diverged"
    spread = f" ± {row['val_loss_std']:.3f}" if row["seeds"] > 1 else " (1 seed)"
    text = f"{row['val_loss_mean']:.3f}{spread}"
    if row["stages"] > 1 and row["gap_to_best_bp_pct"] is not None:
        text += f" ({row['gap_to_best_bp_pct']:+.1f}%)"
        if row["target_reached"] is False:
            text += ", not reached"
        elif row["iso_ratio"] is not None:
            text += f", x{row['iso_ratio']:.2f} steps"
    if row["diverged"]:
        text += f", {row['diverged']} diverged"
    return text


def render_report(summary: dict, plan: Any, figures: list[Path],
                  wallclock: dict | None = None) -> str:
    """The setup, the sweep, one table per horizon, the goal, the wall clock (when timed),
    the seeds, the figures."""
    lines = _setup(summary, plan) + _sweep(summary, plan)
    for horizon in sorted(plan.horizons):
        lines += _horizon_table(summary, plan, horizon)
        lines += _own_rates(summary, horizon)
    lines += _goal(summary, plan) + (_wallclock(wallclock) if wallclock else [])
    lines += _seeds(summary, plan)
    lines += ["", "## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    return "\n".join(lines)


def _setup(summary: dict, plan: Any) -> list[str]:
    shape = plan.shape
    horizons = ", ".join(
        f"{h} ({len(plan.seeds_at(h))} seed{'s' if len(plan.seeds_at(h)) > 1 else ''})"
        for h in sorted(plan.horizons))
    return [
        "# DDG on a transformer language model: the horizon study", "",
        f"`ddgpipe experiment lm`: {plan.model} (width {shape['width']}, {shape['heads']} heads, "
        f"context {shape['context']}, dropout {shape['dropout']}) on the Shakespeare corpus "
        f"(byte tokens), batch {plan.recipe['batch_size']}, at horizons of {horizons} "
        "iterations; each horizon has its own linear warm-up (a tenth of the run) and cosine "
        f"to 0, evals every {plan.horizon_settings(max(plan.horizons))['eval_every']} "
        "iterations. Every run on one thread, reference executor. Recipe: "
        + ", ".join(f"{k} {v}" for k, v in plan.recipe.items()
                    if k not in ("iterations", "warmup_iters", "eval_every")) + ". "
        + summary.get("machines", ""), "",
        "Losses are held-out cross-entropy in nats per byte (one token is one byte). A cell: "
        "mean ± std over seeds; in brackets the gap in % of the best backprop's loss at that "
        "horizon (the best of the AdamW rates, whatever the method's optimizer); then the "
        "iso-loss step ratio, the steps the method's mean curve needs to reach the best "
        "backprop's final loss divided by the horizon (linear between evals), or *not "
        "reached* within the horizon.", ""]


def _sweep(summary: dict, plan: Any) -> list[str]:
    lines = ["## Backprop's learning rate at each horizon", "",
             "The DDG variants marked tuned train at the rate of the best AdamW backprop of "
             "their horizon, resolved from the finished sweep (compared over the seeds every "
             "rate has); the others keep their own optimizer's rate (AsyncPP's recipe, Muon).",
             "", "| iterations | rates tried | best | tuned variants' lr |", "|---|---|---|---|"]
    for horizon in sorted(plan.horizons):
        best = summary["best_bp"].get(str(horizon))
        rates = [r for r in rows_at(summary["rows"], horizon)
                 if VARIANTS_BY_NAME[r["variant"]].sweep]
        tried = ", ".join(f"{r['label']} {r['val_loss_mean']:.3f}" for r in rates
                          if r["val_loss_mean"] is not None) or "–"
        if best is None:
            lines.append(f"| {horizon} | {tried} | not yet (sweep unfinished) | – |")
            continue
        seeds = ", ".join(map(str, best["seeds"]))
        lines.append(f"| {horizon} | {tried} | {best['variant']} ({best['val_loss_mean']:.3f}"
                     f" over seeds {seeds}) | {best['lr']:g} |")
    if summary.get("waiting_for_sweep"):
        lines += ["", "Waiting for their horizon's sweep (not yet planned): the tuned runs at "
                  + ", ".join(map(str, summary["waiting_for_sweep"])) + " iterations."]
    return lines


def _horizon_table(summary: dict, plan: Any, horizon: int) -> list[str]:
    rows = rows_at(summary["rows"], horizon)
    ks = plan.stage_counts
    lines = ["", f"## {horizon} iterations", "", "| method | K = 1 | "
             + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * (len(ks) + 1)]
    for name in plan.variants_at(horizon):
        variant = VARIANTS_BY_NAME[name]
        label = variant.label + (" (tuned lr)" if variant.tuned else "")
        if variant.method == "bp":
            lines.append(f"| {label} | {cell_text(find(rows, horizon, name, 1))} |"
                         + " |" * len(ks))
            continue
        cells = [cell_text(find(rows, horizon, name, k)) if k in plan.stages_of(variant)
                 else "n/a" for k in ks]
        lines.append(f"| {label} | | " + " | ".join(cells) + " |")
    own = [r for r in rows if r["stages"] > 1 and r["baseline"] != BEST_BP
           and r["gap_pct"] is not None]
    if own:
        lines += ["", "Against backprop with the same optimizer and recipe: " + "; ".join(
            f"{r['label']} K = {r['stages']}: {r['gap_pct']:+.1f}% to {r['baseline']}"
            for r in own) + "."]
    return lines


def _family(name: str) -> tuple:
    """What a DDG variant is, its learning rate aside: runs that differ only in rate."""
    v = VARIANTS_BY_NAME[name]
    changes = tuple(sorted((k, str(x)) for k, x in v.changes.items() if k != "lr"))
    return (v.method, v.compensation, changes)


def _own_rates(summary: dict, horizon: int) -> list[str]:
    """DDG swept over rates of its own: per variant and K the loss at each rate tried (gap to
    the best backprop in brackets) and the best, where a variant has two rates or more."""
    rows = [r for r in rows_at(summary["rows"], horizon)
            if r["stages"] > 1 and r["lr"] is not None and r["val_loss_mean"] is not None]
    families: dict[tuple, list[dict]] = {}
    for r in rows:
        families.setdefault(_family(r["variant"]), []).append(r)
    swept = {f: rs for f, rs in families.items() if len({r["lr"] for r in rs}) > 1}
    if not swept:
        return []
    rates = sorted({r["lr"] for rs in swept.values() for r in rs})
    lines = ["", f"DDG's own learning rate at {horizon} iterations (the variants above that "
             "differ only in rate; held-out loss and gap to the best backprop):", "",
             "| variant | K | " + " | ".join(f"{lr:g}" for lr in rates) + " | best |",
             "|---|---|" + "---|" * (len(rates) + 1)]
    for rs in swept.values():
        label = re.sub(r" lr x[\d.]+", "", VARIANTS_BY_NAME[rs[0]["variant"]].label)
        for k in sorted({r["stages"] for r in rs}):
            at = {r["lr"]: r for r in rs if r["stages"] == k}
            cells = [f"{at[lr]['val_loss_mean']:.3f} ({at[lr]['gap_to_best_bp_pct']:+.1f}%)"
                     if lr in at and at[lr]["gap_to_best_bp_pct"] is not None
                     else "–" for lr in rates]
            best = min(at.values(), key=lambda r: r["val_loss_mean"])
            lines.append(f"| {label} | {k} | " + " | ".join(cells)
                         + f" | {best['lr']:g} |")
    return lines


def _goal(summary: dict, plan: Any) -> list[str]:
    goal = summary["goal"]
    lines = ["", "## Goal", "",
             f"With the recommended configuration, DDG within {TOLERANCE_PCT:g}% of the best "
             f"backprop at K = {', '.join(map(str, plan.stage_counts))} at the longest horizon."]
    if goal.get("horizon") is None:
        return lines + ["", "No DDG run has finished yet."]
    if goal["horizon"] != max(plan.horizons):
        lines += ["", f"The longest horizon has no DDG runs yet; this is {goal['horizon']} "
                      "iterations."]
    per_k = "; ".join(f"K = {k}: {v['variant']} {v['gap_pct']:+.2f}%" if v else f"K = {k}: –"
                      for k, v in goal["per_k"].items())
    lines += ["", f"At {goal['horizon']} iterations the closest DDG variant per K: {per_k}."]
    if goal["recommended"] is None:
        leaders = [(v["gap_pct"], k) for k, v in goal["per_k"].items() if v]
        if not leaders or len(leaders) < len(goal["per_k"]):
            return lines + ["No one variant has finished at every K there: no recommendation "
                            "yet."]
        worst, k = max(leaders)  # the configuration of each K's closest variant
        verdict = ("met" if worst <= TOLERANCE_PCT else
                   f"missed by {worst - TOLERANCE_PCT:.2f} percentage points (at K = {k})")
        return lines + ["No one variant has finished at every K there; with each K's closest "
                        f"variant the worst gap is {worst:+.2f}%: the goal is {verdict}."]
    worst = goal["recommended_worst_gap_pct"]
    verdict = ("met" if goal["met"] else
               f"missed by {worst - TOLERANCE_PCT:.2f} percentage points")
    return lines + [f"The variant whose worst K is best, **{goal['recommended']}**, is at most "
                    f"{worst:+.2f}% above the best backprop: the goal is {verdict}."]


def _seeds(summary: dict, plan: Any) -> list[str]:
    fewer = [f"{r['horizon']} {r['label']} K = {r['stages']} ({r['seeds']})"
             for r in summary["rows"] if r["seeds"] < len(plan.seeds_at(r["horizon"]))]
    lines = ["", "## Seeds", "", "Planned seeds per horizon: " + ", ".join(
        f"{h}: {', '.join(map(str, plan.seeds_at(h)))}" for h in sorted(plan.horizons)) + "."]
    if fewer:
        lines += ["", "Cells resting on fewer seeds than planned: " + ", ".join(fewer) + "."]
    if summary.get("missing"):
        lines += ["", f"Missing runs ({len(summary['missing'])}): "
                  + ", ".join(summary["missing"][:20])
                  + (" ..." if len(summary["missing"]) > 20 else "")]
    if summary["diverged"]:
        lines += ["", "Diverged: " + ", ".join(summary["diverged"])]
    return lines


def _num(value: float | None, fmt: str, missing: str = "–") -> str:
    return missing if value is None else format(value, fmt)


def _wallclock(record: dict) -> list[str]:
    """Time to the best backprop's final loss at K = 2 on this machine."""
    optimizer = record.get("bench_optimizer")  # absent: a bench of SGD steps, uncompensated
    timed = (f"every row with {optimizer}, the DDG row with its compensation" if optimizer
             else "SGD; a compensation's own cost is not timed")
    lines = ["", "## Wall clock at K = 2", "",
             f"Time to reach the best backprop's final loss at {record['horizon']} iterations. "
             f"Steps: GPipe, 1F1B and DDP compute backprop's exact gradient at the same batch "
             f"of {record['batch_size']}, so they need backprop's {record['horizon']} steps; "
             f"DDG ({record['variant']}, bench row {record['ddg_row']}) needs its iso-loss "
             f"steps from the table above. Seconds per step: `ddgpipe bench` rows of the same "
             f"model and batch on this machine (median of {record['bench_rounds']} rounds of "
             f"{record['bench_steps']} steps, {timed}). "
             "Time = steps x seconds per step.", "",
             "| configuration | samples/s | s per step | steps | time (s) | vs two-thread BP |",
             "|---|---|---|---|---|---|"]
    for row in record["rows"]:
        steps = _num(row["steps"], ".0f", "not reached")
        lines.append(f"| {row['name']}: {row['what']} | {_num(row['samples_per_s'], '.1f')} | "
                     f"{_num(row['step_s'], '.3f')} | {steps} | {_num(row['time_s'], '.0f')} "
                     f"| {_num(row['vs_bp_2t'], '.2f')} |")
    failed = [f"{r['name']} ({r['error']})" for r in record["rows"] if r.get("error")]
    if failed:
        lines += ["", "Failed bench rows: " + "; ".join(failed)]
    return lines
