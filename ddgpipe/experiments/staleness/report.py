"""The staleness experiment's ``results.md`` and figures, from its summary and run files.

Tables come from ``summary.json``'s data (:mod:`.summary`), figures from the runs'
``metrics.jsonl`` (:mod:`ddgpipe.training.plots`); nothing here computes a number the summary does
not hold, and no sentence states a result that is not computed.
"""

from __future__ import annotations

from pathlib import Path

from ddgpipe.experiments.staleness.plan import (
    GRAD_SHRINK,
    GRAD_SHRINK_WHY,
    MAIN_VARIANTS,
    RECIPE,
    VARIANTS_BY_NAME,
    GridRun,
    StalenessPlan,
    Variant,
    budget_variants,
)
from ddgpipe.experiments.staleness.summary import find, tolerance_pp
from ddgpipe.training.plots import plot_accuracy_panels, plot_mean_loss_panels, plot_seed_panels

__all__ = ["render_report", "make_figures", "DESCRIPTIONS"]

#: what each main-part variant is, and the ``ddgpipe train`` flags that give it
DESCRIPTIONS = {
    "bp": ("backpropagation (K = 1)", "--method bp"),
    "ddg": ("plain DDG, weight stashing (exact delayed gradients)", "--method ddg"),
    "ddg+sc": ("spike compensation (Kosson et al. 2021)", "--compensation sc"),
    "ddg+lwp": ("linear weight prediction (Kosson et al. 2021)", "--compensation lwp"),
    "ddg+dc": ("DC-ASGD-a delay compensation (Zheng et al. 2017)", "--compensation dc"),
    "ddg+pipemare-lr": ("PipeMare T1: lr/delay ramped to lr over one epoch (Yang et al. "
                        "2021)", "--compensation pipemare-lr"),
    "ddg+sc+lwp": ("spike compensation + weight prediction, Kosson et al.'s recommended "
                   "combination", "--compensation sc,lwp"),
    f"ddg+shrink{GRAD_SHRINK:g}": (
        f"FDG gradient shrinking, delayed gradient x {GRAD_SHRINK:g}^delay (Zhuang et al. "
        "2019)", f"--grad-shrink {GRAD_SHRINK:g}"),
    "fr": ("Features Replay: replays each delayed forward at the current weights (Huo et al. "
           "2018)", "--method fr"),
    "fr+pipemare": ("FR with PipeMare T1 + T2 (T2 estimates the forward's weights for the "
                    "replay)", "--method fr --compensation pipemare"),
    "ddg+delay-lr": ("delay-adaptive step: stage k's lr x min(1, 1/d_k) (Mishchenko et al. "
                     "2022)", "--compensation delay-lr"),
    "ddg+accumulate": ("bounded staleness: each delayed stage steps once per 4 of its delayed "
                       "gradients, with their mean (PipeDream-2BW, PACI)",
                       "--compensation accumulate"),
    "ddg+stage-momentum": ("stage-dependent Nesterov momentum 0.9 + d_k (0.99 - 0.9) / K, "
                           "effective step kept (Ajanthan et al. 2025, carried to SGD)",
                           "--compensation stage-momentum"),
    **{f"ddg-m{m}": (f"microbatched DDG: the batch fed as {m} microbatches of batch/{m}, one "
                     "per clock; every stage steps once per batch with their mean gradient, "
                     f"so its staleness is ceil(delay / {m}) steps; K = 4 and 8 only",
                     f"--microbatches {m}") for m in (4, 8)},
}
STYLES = {v.name: (f"C{i}", "--" if v.method == "fr" else "-")
          for i, v in enumerate(MAIN_VARIANTS)}


def _runs_by_key(runs: list[GridRun], summary: dict, out: Path) -> dict:
    """(benchmark, variant, K) -> the run folders that finished, by seed."""
    diverged = set(summary["diverged"])
    found: dict[tuple[str, str, int], list[Path]] = {}
    for run in runs:
        if run.name not in diverged:
            found.setdefault((run.benchmark, run.variant.name, run.stages), []).append(
                out / run.name)
    return found


def _line(found: dict, bench: str, variant: Variant, k: int):
    """A plot line: the variant's finished runs at K = ``k`` (backprop's at K = 1)."""
    colour, style = STYLES.get(variant.name) or STYLES[
        "bp" if variant.method == "bp" else "ddg"]
    stages = 1 if variant.method == "bp" else k
    return variant.label, found.get((bench, variant.name, stages), []), colour, style


def make_figures(summary: dict, plan: StalenessPlan, runs: list[GridRun],
                 out: Path) -> list[Path]:
    """Training loss per K and benchmark (one line per method, mean over seeds), every seed
    of backprop and plain DDG, the long-budget runs, and accuracy against K."""
    found = _runs_by_key(runs, summary, out)
    bp, ddg = VARIANTS_BY_NAME["bp"], VARIANTS_BY_NAME["ddg"]
    figures = []
    for bench in plan.benchmarks:
        title = f"{plan.benchmark(bench).model} on {bench}"
        if "main" in plan.parts:
            panels = [(f"K = {k}", [_line(found, bench, VARIANTS_BY_NAME[name], k)
                                    for name in plan.variants]) for k in plan.stage_counts]
            figures.append(plot_mean_loss_panels(panels, out / f"loss-{bench}.png",
                                                 title=f"{title}: training loss per method"))
            panels = [(f"K = {k}", [_line(found, bench, bp, k), _line(found, bench, ddg, k)])
                      for k in plan.stage_counts]
            figures.append(plot_seed_panels(panels, out / f"seeds-{bench}.png",
                                            title=f"{title}: BP and plain DDG, every seed"))
        if "budget" in plan.parts:
            long = budget_variants(plan.budget_factor)
            panels = [(f"K = {k}", [_line(found, bench, v, k) for v in long])
                      for k in plan.part_scope("budget")[1]]
            figures.append(plot_seed_panels(
                panels, out / f"budget-{bench}.png",
                title=f"{title}: {plan.budget_factor}x the epochs, per seed"))
    if "main" in plan.parts:
        figures.append(plot_accuracy_panels([_accuracy_panel(summary["rows"], plan, bench)
                                             for bench in plan.benchmarks],
                                            out / "accuracy-vs-k.png"))
    return figures


def _accuracy_panel(rows: list[dict], plan: StalenessPlan, bench: str):
    bp = find(rows, bench, "bp", 1)
    series = []
    for name in plan.variants:
        if VARIANTS_BY_NAME[name].method == "bp":
            continue
        points = [(r["stages"], r["test_acc_mean"], r["test_acc_std"]) for r in rows
                  if r["benchmark"] == bench and r["variant"] == name
                  and r["test_acc_mean"] is not None]
        series.append((VARIANTS_BY_NAME[name].label, STYLES[name][0], points))
    return f"{plan.benchmark(bench).model} on {bench}", bp and bp["test_acc_mean"], series


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _acc_cell(row: dict | None, gap: bool = True) -> str:
    if row is None:
        return "–"
    if row["seeds"] == 0:
        return f"diverged ({row['diverged']}/{row['diverged']})"
    cell = f"{row['test_acc_mean']:.2f} ± {row['test_acc_std']:.2f}"
    if gap and row["gap_to_bp_pp"] is not None and row["method"] != "bp":
        cell += f" ({row['gap_to_bp_pp']:+.2f})"
    if row["diverged"]:
        cell += f" [{row['diverged']} diverged]"
    if row.get("missing"):
        cell += f" [{row['seeds']} seed{'s' if row['seeds'] != 1 else ''}]"
    return cell


def _loss_cell(row: dict | None) -> str:
    if row is None or row["seeds"] == 0:
        return "–" if row is None else "diverged"
    return f"{row['train_loss_mean']:.4f} ± {row['train_loss_std']:.4f}"


def _mark(ok: bool | None) -> str:
    return {True: "✓", False: "✗", None: "n/a"}[ok]


def render_report(summary: dict, plan: StalenessPlan, figures: list[Path], out: Path) -> str:
    ks = plan.stage_counts
    k_head = " | ".join(f"K={k}" for k in ks)
    k_rule = "|".join("---" for _ in ks)
    recipe = ", ".join(f"{k} {v}" for k, v in RECIPE.items())
    lines = [
        "# Staleness compensation, compared",
        "",
        "Produced by `ddgpipe experiment staleness`"
        + (" (`--quick`: a smoke test, not a result)" if plan.quick else "") + ". "
        f"Every method trains with backprop's hyperparameters, unchanged for every K: momentum "
        f"SGD ({recipe}). Seeds {', '.join(map(str, plan.seeds))}; K = "
        f"{', '.join(map(str, ks))}; parts: {', '.join(plan.parts)}; {summary.get('runs', '?')}"
        f" runs; {summary.get('train_time_s', 0) / 3600:.2f} hours of training summed over the "
        f"runs (one core each), {summary.get('wall_time_s', 0) / 60:.1f} minutes of wall time "
        "in the invocation that wrote this report. Accuracy is the final test accuracy and "
        "loss the final epoch's training loss, mean ± std over seeds; gap = mean accuracy minus "
        "backprop's (points). Runs whose loss diverged (NaN or inf) are left out of the means "
        "and counted in the cell. " + summary.get("machines", ""),
        "",
        "Benchmarks:",
        "",
    ]
    for bench in plan.benchmarks:
        spec = plan.benchmark(bench)
        lines.append(f"- `{bench}`: {spec.model}, {spec.epochs} epochs, batch {spec.batch_size}"
                     f" — {spec.note}.")
    lines += ["", "| method | what | flags |", "|---|---|---|"]
    for name in plan.variants:
        what, flags = DESCRIPTIONS[name]
        lines.append(f"| {VARIANTS_BY_NAME[name].label} | {what} | `{flags}` |")
    lines.append("")
    if any(VARIANTS_BY_NAME[name].grad_shrink != 1.0 for name in plan.variants):
        lines += [GRAD_SHRINK_WHY, ""]
    if summary.get("missing"):
        lines += [
            "## Incomplete grid", "",
            f"**This report covers {summary['runs']} of the plan's "
            f"{summary['runs'] + len(summary['missing'])} runs** (written with `--report-only`)"
            ". A cell with fewer seeds than planned says how many it averages, and the goals "
            "below are computed from those means. Not trained yet: "
            + ", ".join(f"`{name}`" for name in summary["missing"]) + ". The same command "
            "without `--report-only` trains them and writes the full report.", ""]
    lines += _goals_section(summary, plan)
    for bench in plan.benchmarks:
        lines += _benchmark_section(summary, plan, bench, k_head, k_rule)
    if summary["sweep"]:
        lines += _sweep_section(summary, plan)
    if summary["budget"]:
        lines += _budget_section(summary, plan)
    if summary["diverged"]:
        lines += ["## Diverged runs", "", "Loss NaN or infinite; each folder's `diverged.json` "
                  "says at which minibatch: " + ", ".join(f"`{d}`" for d in summary["diverged"])
                  + ".", ""]
    lines += ["## Figures", ""]
    lines += [f"![{fig.stem}]({fig.relative_to(out)})" for fig in figures]
    lines.append("")
    return "\n".join(lines)


def _goals_section(summary: dict, plan: StalenessPlan) -> list[str]:
    if not summary["goals"]:
        return []
    ks = plan.stage_counts
    tolerances = ", ".join(f"{tolerance_pp(k):g} at K={k}" for k in ks)
    lines = [
        "## Goals",
        "",
        f"A method meets the goals when, at every K, (1) its mean accuracy is within the "
        f"tolerance of backprop's ({tolerances} points) with no diverged seed, and (2) it is no "
        "worse than plain DDG at its best swept learning rate (mean against mean, no allowance "
        "for seed noise). Each cell: gap to BP, then the difference to the best-rate DDG, each "
        "with ✓/✗; n/a where a part it needs was not run.",
        "",
        "| benchmark | method | " + " | ".join(f"K={k}" for k in ks) + " | goals met |",
        "|---|---|" + "|".join("---" for _ in ks) + "|---|",
    ]
    for goal in summary["goals"]:
        cells = ["not run at this K" if c.get("not_run") else
                 f"{_num(c['gap_to_bp_pp'], '+.2f')} {_mark(c['within_bp'])} / "
                 f"{_num(c['vs_tuned_ddg_pp'], '+.2f')} {_mark(c['not_worse_than_tuned_ddg'])}"
                 + (f" [{c['diverged']} diverged]" if c["diverged"] else "")
                 for c in goal["per_k"]]
        met = {True: "**yes**", False: "no", None: "n/a"}[goal["met"]]
        lines.append(f"| {goal['benchmark']} | {goal['label']} | {' | '.join(cells)} | {met} |")
    meeting = [f"{g['label']} ({g['benchmark']})" for g in summary["goals"] if g["met"]]
    lines += ["", "Meeting the goals: " + (", ".join(meeting) if meeting else "none") + ".", ""]
    return lines


def _benchmark_section(summary: dict, plan: StalenessPlan, bench: str, k_head: str,
                       k_rule: str) -> list[str]:
    rows = summary["rows"]
    spec = plan.benchmark(bench)
    if "main" not in plan.parts:
        return []
    bp = find(rows, bench, "bp", 1)
    lines = [f"## {bench}: {spec.model}, {spec.epochs} epochs", "",
             f"Backprop: test accuracy {_acc_cell(bp, gap=False)} %, training loss "
             f"{_loss_cell(bp)}.", "",
             "Test accuracy (%) and gap to BP (points):", "",
             f"| method | {k_head} |", f"|---|{k_rule}|"]
    names = [n for n in plan.variants if VARIANTS_BY_NAME[n].method != "bp"]
    for name in names:
        cells = [_acc_cell(find(rows, bench, name, k)) for k in plan.stage_counts]
        lines.append(f"| {VARIANTS_BY_NAME[name].label} | {' | '.join(cells)} |")
    lines += ["", "Training loss, final epoch:", "", f"| method | {k_head} |", f"|---|{k_rule}|"]
    for name in names:
        cells = [_loss_cell(find(rows, bench, name, k)) for k in plan.stage_counts]
        lines.append(f"| {VARIANTS_BY_NAME[name].label} | {' | '.join(cells)} |")
    lines.append("")
    return lines


def _sweep_section(summary: dict, plan: StalenessPlan) -> list[str]:
    rates = " | ".join(f"lr {lr:g}" for lr in plan.sweep_lrs)
    lines = ["## Plain DDG's learning-rate sweep", "",
             "Plain DDG (same recipe, only the base learning rate changed) at each rate; the "
             "best is the highest mean among rates where no seed diverged. Accuracy (%), gap "
             "to backprop (at backprop's own rate) in brackets.", "",
             f"| benchmark | K | {rates} | best lr | best: gap to BP |",
             "|---|---|" + "|".join("---" for _ in plan.sweep_lrs) + "|---|---|"]
    for entry in summary["sweep"]:
        cells = []
        for rate in entry["rates"]:
            row = find(summary["rows"], entry["benchmark"], rate["variant"], entry["stages"])
            cells.append(_acc_cell(row))
        lines.append(f"| {entry['benchmark']} | {entry['stages']} | {' | '.join(cells)} | "
                     f"{_num(entry['best_lr'], 'g')} | "
                     f"{_num(entry['best_gap_to_bp_pp'], '+.2f')} |")
    lines.append("")
    return lines


def _budget_section(summary: dict, plan: StalenessPlan) -> list[str]:
    f = plan.budget_factor
    seeds, stage_counts = plan.part_scope("budget")
    lines = [f"## Budget: backprop and plain DDG with {f}x the epochs", "",
             f"The same runs with {f}x the epochs (same recipe: the cosine schedule stretched, "
             f"one warm-up epoch), at K = {', '.join(map(str, stage_counts))} and on "
             f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} only (a long "
             f"run costs {f} short ones); every number in this table, the 1x column included, "
             "is the mean over those seeds. The gap at each budget is to backprop at the same "
             "budget and seeds; "
             "change = gap at the long budget minus gap at the short one (positive: the gap "
             "closes).", "",
             f"| benchmark | method | K | acc 1x | acc {f}x | gap 1x | gap {f}x | change | "
             f"loss 1x | loss {f}x |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary["budget"]:
        short, long = e["short"], e["long"]
        if e["method"] == "bp":
            gaps = ["", "", ""]
        else:
            gaps = [_num(short and short["gap_to_bp_pp"], "+.2f"),
                    _num(long and long["gap_to_bp_pp"], "+.2f"), _num(e["gap_change_pp"], "+.2f")]
        lines.append(f"| {e['benchmark']} | {e['method'].upper()} | {e['stages']} | "
                     f"{_budget_acc(short)} | {_budget_acc(long)} | {' | '.join(gaps)} | "
                     f"{_num(short and short['train_loss_mean'], '.4f')} | "
                     f"{_num(long and long['train_loss_mean'], '.4f')} |")
    lines.append("")
    return lines


def _budget_acc(part: dict | None) -> str:
    if part is None:
        return "–"
    if part["test_acc_mean"] is None:
        return "diverged"
    cell = f"{part['test_acc_mean']:.2f} ± {part['test_acc_std']:.2f}"
    return cell + (f" [{part['diverged']} diverged]" if part["diverged"] else "")
