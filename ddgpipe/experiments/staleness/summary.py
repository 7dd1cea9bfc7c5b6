"""The staleness experiment's arithmetic: outcomes of runs in, tables and goals out.

Why and how: ``docs/design.md``, "The staleness experiment's goals".
"""

from __future__ import annotations

from typing import Any

from ddgpipe.experiments.common import FINISHED, mean_std
from ddgpipe.experiments.staleness.plan import (
    VARIANTS_BY_NAME,
    StalenessPlan,
    Variant,
    budget_variants,
    sweep_variant,
)

__all__ = ["summarise", "tolerance_pp", "summary_rows", "sweep_table", "budget_table",
           "goals_table"]


def tolerance_pp(stages: int) -> float:
    """How far below backprop's accuracy a method may be at K = ``stages`` (points)."""
    return 0.5 if stages <= 4 else 1.0


def summarise(outcomes: list[dict], plan: StalenessPlan) -> dict:
    variants = {v.name: v for part in plan.parts for v in plan.part_variants(part)}
    rows = summary_rows(outcomes, variants)
    sweep = sweep_table(rows, plan) if "sweep" in plan.parts else []
    return {
        "rows": rows,
        "sweep": sweep,
        "budget": budget_table(rows, plan) if "budget" in plan.parts else [],
        "goals": goals_table(rows, sweep, plan) if "main" in plan.parts else [],
        "diverged": sorted(o["name"] for o in outcomes if o["status"] != FINISHED),
    }


def summary_rows(outcomes: list[dict], variants: dict[str, Variant]) -> list[dict]:
    """Mean ± std over seeds per (benchmark, variant, K), and the gap to backprop's mean."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for o in outcomes:
        groups.setdefault((o["benchmark"], o["variant"], o["stages"]), []).append(o)
    rows: list[dict[str, Any]] = []
    for (bench, name, k), runs in groups.items():
        variant = variants[name]
        done = [r for r in runs if r["status"] == FINISHED]
        acc = [100 * r["test_acc"] for r in done]
        loss = [r["train_loss"] for r in done]
        acc_mean, acc_std = mean_std(acc)
        loss_mean, loss_std = mean_std(loss)
        rows.append({
            "benchmark": bench, "variant": name, "label": variant.label,
            "method": variant.method, "compensation": variant.compensation,
            "grad_shrink": variant.grad_shrink, "lr": variant.lr,
            "epochs_factor": variant.epochs_factor, "baseline": variant.baseline, "stages": k,
            "seeds": len(done), "diverged": len(runs) - len(done),
            "test_acc": acc, "test_acc_mean": acc_mean, "test_acc_std": acc_std,
            "by_seed": {r["seed"]: {"test_acc": 100 * r["test_acc"],
                                    "train_loss": r["train_loss"]} for r in done},
            "seeds_run": sorted(r["seed"] for r in runs),
            "train_loss_mean": loss_mean, "train_loss_std": loss_std,
        })
    for row in rows:
        bp = find(rows, row["benchmark"], row["baseline"], 1)
        row["gap_to_bp_pp"] = None if bp is None or bp["test_acc_mean"] is None or \
            row["test_acc_mean"] is None else row["test_acc_mean"] - bp["test_acc_mean"]
    return rows


def find(rows: list[dict], benchmark: str, variant: str, stages: int) -> dict | None:
    return next((r for r in rows if r["benchmark"] == benchmark and r["variant"] == variant
                 and r["stages"] == stages), None)


def _usable(row: dict | None) -> bool:
    """A row whose every seed finished (a rate at which some seed diverged is no candidate)."""
    return row is not None and row["seeds"] > 0 and row["diverged"] == 0


def sweep_table(rows: list[dict], plan: StalenessPlan) -> list[dict]:
    """Per benchmark and K: plain DDG at every swept rate, and the best of them."""
    table: list[dict[str, Any]] = []
    for bench in plan.benchmarks:
        for k in plan.stage_counts:
            rates: list[dict[str, Any]] = []
            for lr in plan.sweep_lrs:
                row = find(rows, bench, sweep_variant(lr).name, k)
                rates.append({"lr": lr, "variant": sweep_variant(lr).name,
                              "test_acc_mean": row and row["test_acc_mean"],
                              "test_acc_std": row and row["test_acc_std"],
                              "seeds": row["seeds"] if row else 0,
                              "diverged": row["diverged"] if row else 0})
            candidates = [(r["test_acc_mean"], r) for r in rates
                          if _usable(find(rows, bench, r["variant"], k))]
            best = max(candidates, key=lambda c: c[0])[1] if candidates else None
            bp = find(rows, bench, "bp", 1)
            table.append({
                "benchmark": bench, "stages": k, "rates": rates,
                "best_lr": best and best["lr"],
                "best_acc_mean": best and best["test_acc_mean"],
                "best_acc_std": best and best["test_acc_std"],
                "best_gap_to_bp_pp": None if best is None or bp is None
                or bp["test_acc_mean"] is None else best["test_acc_mean"] - bp["test_acc_mean"],
            })
    return table


def _on_seeds(row: dict | None, bp: dict | None, seeds: tuple[int, ...]) -> dict | None:
    """``row`` as if only ``seeds`` had been run (gap to ``bp`` on the same seeds), so the
    budget part, which trains fewer seeds, compares like with like."""
    if row is None:
        return None
    picked = [row["by_seed"][s] for s in seeds if s in row["by_seed"]]
    acc_mean, acc_std = mean_std([p["test_acc"] for p in picked])
    loss_mean, loss_std = mean_std([p["train_loss"] for p in picked])
    bp_mean = None
    if bp is not None:
        bp_mean, _ = mean_std([bp["by_seed"][s]["test_acc"] for s in seeds
                               if s in bp["by_seed"]])
    return {"test_acc_mean": acc_mean, "test_acc_std": acc_std,
            "gap_to_bp_pp": None if acc_mean is None or bp_mean is None else acc_mean - bp_mean,
            "train_loss_mean": loss_mean, "train_loss_std": loss_std, "seeds": len(picked),
            "diverged": len([s for s in seeds if s in row["seeds_run"]]) - len(picked)}


def budget_table(rows: list[dict], plan: StalenessPlan) -> list[dict]:
    """Backprop and plain DDG at the benchmark's epochs and at ``budget_factor`` times them,
    on the budget part's seeds: the gap to backprop (at the same budget and seeds) before and
    after."""
    bp_long, ddg_long = budget_variants(plan.budget_factor)
    seeds, stage_counts = plan.part_scope("budget")
    table: list[dict[str, Any]] = []
    for bench in plan.benchmarks:
        pairs = [("bp", bp_long.name, 1)] + [("ddg", ddg_long.name, k) for k in stage_counts]
        for short, long, k in pairs:
            before = _on_seeds(find(rows, bench, short, k), find(rows, bench, "bp", 1), seeds)
            after = _on_seeds(find(rows, bench, long, k), find(rows, bench, bp_long.name, 1),
                              seeds)
            change = None
            if before and after and None not in (before["gap_to_bp_pp"], after["gap_to_bp_pp"]):
                change = after["gap_to_bp_pp"] - before["gap_to_bp_pp"]
            table.append({"benchmark": bench, "method": VARIANTS_BY_NAME[short].method,
                          "stages": k, "epochs_factor": plan.budget_factor,
                          "seeds": list(seeds), "short": before,
                          "long": after, "gap_change_pp": change})
    return table


def goals_table(rows: list[dict], sweep: list[dict], plan: StalenessPlan) -> list[dict]:
    """Per benchmark and main-part method: each goal at each K, and whether all are met."""
    table: list[dict[str, Any]] = []
    for bench in plan.benchmarks:
        for name in plan.variants:
            if VARIANTS_BY_NAME[name].method == "bp":
                continue
            per_k: list[dict[str, Any]] = []
            for k in plan.stage_counts:
                if not VARIANTS_BY_NAME[name].runs_at(k):  # a microbatched row's missing K
                    per_k.append({"stages": k, "not_run": True, "diverged": 0})
                    continue
                row = find(rows, bench, name, k)
                tuned = next((s for s in sweep if s["benchmark"] == bench and s["stages"] == k),
                             None)
                gap = None if row is None else row["gap_to_bp_pp"]
                within = None if row is None else (
                    _usable(row) and gap is not None and gap >= -tolerance_pp(k))
                margin = not_worse = None
                if row is not None and tuned is not None and tuned["best_acc_mean"] is not None:
                    if row["test_acc_mean"] is not None:
                        margin = row["test_acc_mean"] - tuned["best_acc_mean"]
                    not_worse = _usable(row) and margin is not None and margin >= 0
                per_k.append({"stages": k, "gap_to_bp_pp": gap, "tolerance_pp": tolerance_pp(k),
                              "within_bp": within, "vs_tuned_ddg_pp": margin,
                              "not_worse_than_tuned_ddg": not_worse,
                              "diverged": row["diverged"] if row else 0})
            checks = [c[key] for c in per_k if not c.get("not_run")
                      for key in ("within_bp", "not_worse_than_tuned_ddg")]
            met = False if False in checks else (None if None in checks else True)
            table.append({"benchmark": bench, "variant": name,
                          "label": VARIANTS_BY_NAME[name].label, "per_k": per_k, "met": met})
    return table
