"""``results.md`` of the language-model experiment, and its figures, from ``summary.json``'s
data and the runs' own metrics files."""

from __future__ import annotations

from pathlib import Path

from ddgpipe.experiments.lm.plan import VARIANTS_BY_NAME, GridRun, LMPlan
from ddgpipe.experiments.lm.summary import TOLERANCE_PCT, find
from ddgpipe.training.lm_plots import LMLine, plot_lm_panels

__all__ = ["make_figures", "render_report"]

COLOURS = {"bp": "black", "ddg": "C0", "ddg-lr0.5": "C9", "ddg-lr0.25": "C5",
           "ddg+dc": "C1", "ddg+pipemare-lr": "C2", "ddg+delay-lr": "C3",
           "ddg+accumulate": "C4", "ddg+stage-momentum": "C6", "ddg-nadam": "C7",
           "ddg-muon": "C8", "bp-nadam": "grey", "bp-muon": "tan"}


def _seeds_note(seeds: list, planned) -> str:
    """Which seeds the sweep's bar rests on, when not all of the plan's."""
    if [str(x) for x in seeds] == [str(x) for x in planned]:
        return ""
    return f" over seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"

def make_figures(plan: LMPlan, runs: list[GridRun], out: Path) -> list[Path]:
    """Held-out bits per byte per K (mean over seeds) against tokens and against time."""
    by_variant: dict[str, dict[int, list[Path]]] = {}
    for run in runs:
        if (out / run.name / "metrics.jsonl").exists():
            by_variant.setdefault(run.variant.name, {}).setdefault(run.stages, []).append(
                out / run.name)
    panels = []
    for k in plan.stage_counts:
        lines: list[LMLine] = []
        for name in plan.variants:
            stages = 1 if VARIANTS_BY_NAME[name].method == "bp" else k
            found = by_variant.get(name, {}).get(stages, [])
            style = "--" if VARIANTS_BY_NAME[name].method == "bp" else None
            lines.append((VARIANTS_BY_NAME[name].label, found, COLOURS.get(name), style))
        panels.append((f"K = {k}", lines))
    if not panels:
        return []
    # Against wall time too, as a sketch: every run computes on one core with the reference
    # executor (no overlap between stages), and its clock also counts whatever else shares
    # the machine; the bench measures speed.
    return [plot_lm_panels(panels, out / "loss-tokens.png", "tokens",
                           "held-out loss against tokens seen"),
            plot_lm_panels(panels, out / "loss-time.png", "wall_time",
                           "held-out loss against training time (one core per run, reference "
                           "executor: not DDG's speed)")]


def _cell(row: dict | None, gap_key: str = "gap_pct") -> str:
    if row is None or row["val_loss_mean"] is None:
        return "–"
    # one seed has no spread to show: say so instead of a ± 0
    std = f" ± {row['val_loss_std']:.3f}" if row["seeds"] > 1 else " (1 seed)"
    gap = row.get(gap_key)
    tail = "" if gap is None or row["stages"] == 1 else f" ({gap:+.1f}%)"
    diverged = f", {row['diverged']} diverged" if row["diverged"] else ""
    return f"{row['val_loss_mean']:.3f}{std}{tail}{diverged}"


def render_report(summary: dict, plan: LMPlan, figures: list[Path], out: Path) -> str:
    """``results.md``: the setup, the loss table, the gaps, the goals, the figures."""
    lines = _setup(summary, plan) + _loss_table(summary["rows"], plan)
    lines += _gap_table(summary["rows"], plan) + _goals(summary, plan)
    lines += ["", "## Figures", "",
              "Against training time, each run computed every stage in turn on one core (the "
              "reference executor), so the time axis shows what a method costs in compute "
              "(Muon's orthogonalisation, a replay), not DDG's parallel speed (see the bench); "
              "the runs shared the machine with other work, so times are rough.", ""]
    lines += [f"![{f.stem}]({f.name})" for f in figures] + [""]
    return "\n".join(lines)


def _setup(summary: dict, plan: LMPlan) -> list[str]:
    shape = plan.shape
    return [
        "# DDG on a transformer language model",
        "",
        f"`ddgpipe experiment lm`: {plan.model} (width {shape['width']}, {shape['heads']} heads, "
        f"context {shape['context']}, dropout {shape['dropout']}) on the Shakespeare corpus "
        f"(byte tokens), {plan.recipe['iterations']} iterations of batch "
        f"{plan.recipe['batch_size']}, seeds {', '.join(map(str, plan.seeds))}; every run on "
        "one thread, reference executor. Backprop's recipe for every method and K: "
        + ", ".join(f"{k} {v}" for k, v in plan.recipe.items()) + ". "
        + summary.get("machines", ""),
        "",
    ]


def _header(ks: tuple[int, ...], extra: str = "") -> list[str]:
    columns = " | ".join(f"K = {k}" for k in ks)
    return [f"| method | {columns} |{extra}", "|---|" + "---|" * (len(ks) + bool(extra))]


def _loss_table(rows: list[dict], plan: LMPlan) -> list[str]:
    ks = plan.stage_counts
    lines = [
        "Final held-out loss (nats per byte, mean ± std over seeds) and, in brackets, the gap "
        "to backprop with the same optimizer, in % of its loss. Lower is better; the goal is "
        f"within {TOLERANCE_PCT:g}%.",
        "",
        *_header(ks),
    ]
    for name in plan.variants:
        variant = VARIANTS_BY_NAME[name]
        if variant.method == "bp":
            row = find(rows, name, 1)
            lines.append(f"| {variant.label} | {_cell(row)} (K = 1) |" + " |" * (len(ks) - 1))
        else:
            lines.append(f"| {variant.label} | " + " | ".join(_cell(find(rows, name, k))
                                                            for k in ks) + " |")
    bp = find(rows, "bp", 1)
    if bp and bp["val_bpb_mean"] is not None:
        lines += ["", f"Backprop (AdamW) ends at {bp['val_bpb_mean']:.3f} bits per byte."]
    return lines


def _gap_table(rows: list[dict], plan: LMPlan) -> list[str]:
    ks = plan.stage_counts
    lines = ["", "Gap to backprop with AdamW, whatever the method's optimizer (%):", "",
             *_header(ks)]
    for name in plan.variants:
        if VARIANTS_BY_NAME[name].method == "bp":
            continue
        cells = []
        for k in ks:
            row = find(rows, name, k)
            gap = None if row is None else row["gap_to_adamw_pct"]
            cells.append("–" if gap is None else f"{gap:+.1f}")
        lines.append(f"| {VARIANTS_BY_NAME[name].label} | " + " | ".join(cells) + " |")
    return lines


def _goals(summary: dict, plan: LMPlan) -> list[str]:
    ks = plan.stage_counts
    lines = ["", "## Goals", "",
             f"Within {TOLERANCE_PCT:g}% of backprop's held-out loss at every K, and no worse "
             "than plain DDG at its best swept learning rate (" + "; ".join(
                 f"K = {s['stages']}: {s['best']}" + _seeds_note(s["seeds"], plan.seeds)
                 for s in summary["sweep"] if s["best"])
             + "). Where the swept rates have fewer seeds than a method, both are compared "
             "over the seeds they share.", "",
             *_header(ks, " met |")]
    marks = {True: "yes", False: "no", None: "n/a"}
    for goal in summary["goals"]:
        cells = [f"{marks[c['within']]} / {marks[c['no_worse_than_tuned_ddg']]}"
                 for c in goal["per_k"]]
        lines.append(f"| {goal['label']} | " + " | ".join(cells) + f" | {marks[goal['met']]} |")
    lines += ["", "Each cell: within the tolerance / no worse than tuned DDG."]
    if summary.get("missing"):
        lines += ["", f"Missing runs ({len(summary['missing'])}): "
                  + ", ".join(summary["missing"][:20])
                  + (" ..." if len(summary["missing"]) > 20 else "")]
    if summary["diverged"]:
        lines += ["", "Diverged: " + ", ".join(summary["diverged"])]
    return lines
