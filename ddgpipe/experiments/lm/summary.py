"""The language-model experiment's arithmetic: run outcomes in, tables and goals out (pure)."""

from __future__ import annotations

import statistics
from typing import Any

from ddgpipe.experiments.common import FINISHED, mean_std
from ddgpipe.experiments.lm.plan import SWEEP, VARIANTS_BY_NAME, LMPlan

__all__ = ["summarise", "TOLERANCE_PCT", "find"]

TOLERANCE_PCT = 1.0  # the goal: within 1% of backprop's held-out loss


def find(rows: list[dict], variant: str, stages: int) -> dict | None:
    return next((r for r in rows if r["variant"] == variant and r["stages"] == stages), None)


def _gap_pct(loss: float | None, base: dict | None) -> float | None:
    if loss is None or base is None or base["val_loss_mean"] is None:
        return None
    return 100.0 * (loss - base["val_loss_mean"]) / base["val_loss_mean"]


def summarise(outcomes: list[dict], plan: LMPlan) -> dict:
    groups: dict[tuple[str, int], list[dict]] = {}
    for o in outcomes:
        groups.setdefault((o["variant"], o["stages"]), []).append(o)
    rows: list[dict[str, Any]] = []
    for (name, k), runs in groups.items():
        done = [r for r in runs if r["status"] == FINISHED]
        loss_mean, loss_std = mean_std([r["val_loss"] for r in done])
        bpb_mean, bpb_std = mean_std([r["val_bits_per_byte"] for r in done])
        variant = VARIANTS_BY_NAME[name]
        rows.append({
            "variant": name, "label": variant.label, "baseline": variant.baseline,
            "stages": k, "seeds": len(done), "diverged": len(runs) - len(done),
            "val_loss": [r["val_loss"] for r in done], "val_loss_mean": loss_mean,
            "val_loss_std": loss_std, "val_bpb_mean": bpb_mean, "val_bpb_std": bpb_std,
            "train_time_s_mean": mean_std([r["train_time_s"] for r in done])[0],
            "by_seed": {r["seed"]: r["val_loss"] for r in done},
        })
    for row in rows:
        row["gap_pct"] = _gap_pct(row["val_loss_mean"], find(rows, row["baseline"], 1))
        row["gap_to_adamw_pct"] = _gap_pct(row["val_loss_mean"], find(rows, "bp", 1))
    return {"rows": rows, "sweep": _sweep(rows, plan), "goals": _goals(rows, plan),
            "diverged": sorted(o["name"] for o in outcomes if o["status"] != FINISHED)}


def _sweep(rows: list[dict], plan: LMPlan) -> list[dict]:
    """Per K: plain DDG's best rate, the bar every remedy must clear, over the seeds every
    rate has (so a partial grid compares like with like)."""
    table = []
    for k in plan.stage_counts:
        tried = _rates(rows, k)
        seeds = sorted(set.intersection(*(set(r["by_seed"]) for r in tried))) if tried else []
        best = _best_rate(tried, seeds)
        table.append({"stages": k, "best": best and best[1]["variant"],
                      "best_val_loss_mean": best and best[0], "rates": len(tried),
                      "seeds": seeds})
    return table


def _rates(rows: list[dict], k: int) -> list[dict]:
    return [r for name in SWEEP if (r := find(rows, name, k)) and r["val_loss_mean"]
            is not None and not r["diverged"]]


def _best_rate(tried: list[dict], seeds: list) -> tuple[float, dict] | None:
    """The lowest mean held-out loss over ``seeds`` among the swept rates that have them all."""
    scored = [(statistics.fmean(r["by_seed"][s] for s in seeds), r) for r in tried
              if seeds and all(s in r["by_seed"] for s in seeds)]
    return min(scored, key=lambda t: t[0], default=None)


def _goals(rows: list[dict], plan: LMPlan) -> list[dict]:
    sweep = {s["stages"]: s for s in _sweep(rows, plan)}
    table = []
    for name in plan.variants:
        if VARIANTS_BY_NAME[name].method == "bp":
            continue
        per_k = []
        for k in plan.stage_counts:
            row = find(rows, name, k)
            gap = None if row is None else row["gap_pct"]
            within = None if row is None or gap is None else \
                bool(gap <= TOLERANCE_PCT and not row["diverged"])
            beats = None
            if row is not None and row["val_loss_mean"] is not None:
                # the row's seeds that the sweep also has, and the sweep's bar over just those
                common = sorted(set(row["by_seed"]) & set(sweep.get(k, {}).get("seeds", [])))
                bar = _best_rate(_rates(rows, k), common)
                if bar is not None:
                    mine = statistics.fmean(row["by_seed"][s] for s in common)
                    beats = bool(mine <= bar[0])
            per_k.append({"stages": k, "gap_pct": gap, "within": within,
                          "no_worse_than_tuned_ddg": beats})
        flags = [c[key] for c in per_k for key in ("within", "no_worse_than_tuned_ddg")]
        met = None if any(f is None for f in flags) else all(flags)
        table.append({"variant": name, "label": VARIANTS_BY_NAME[name].label, "per_k": per_k,
                      "met": met})
    return table
