"""The language-model study's arithmetic (pure): run outcomes and loss curves in; per horizon
the best backprop rate, each cell's loss, gaps and iso-loss step ratio, and the goal out."""

from __future__ import annotations

import statistics
from typing import Any

from ddgpipe.experiments.common import FINISHED, mean_std
from ddgpipe.experiments.lm.curves import Curve, steps_to_reach
from ddgpipe.experiments.lm.variants import BEST_BP, RECIPE, VARIANTS_BY_NAME

__all__ = ["summarise", "best_backprop", "rows_at", "find", "TOLERANCE_PCT"]

TOLERANCE_PCT = 1.0  # the goal: within 1% of the best backprop's held-out loss
CurveKey = tuple[int, str, int]  # horizon, variant, K


def find(rows: list[dict], horizon: int, variant: str, stages: int) -> dict | None:
    return next((r for r in rows if r["horizon"] == horizon and r["variant"] == variant
                 and r["stages"] == stages), None)


def rows_at(rows: list[dict], horizon: int) -> list[dict]:
    return [r for r in rows if r["horizon"] == horizon]


def best_backprop(outcomes: list[dict], horizon: int) -> dict | None:
    """The AdamW backprop rate with the lowest mean held-out loss at ``horizon``, over the
    seeds every finished rate has (like with like); a rate with a diverged seed is out.
    None when no rate has finished."""
    by_rate: dict[str, dict[int, float | None]] = {}
    for o in outcomes:
        if o["horizon"] == horizon and VARIANTS_BY_NAME[o["variant"]].sweep:
            by_rate.setdefault(o["variant"], {})[o["seed"]] = \
                o["val_loss"] if o["status"] == FINISHED else None
    rates = {name: {s: loss for s, loss in seeds.items() if loss is not None}
             for name, seeds in by_rate.items() if None not in seeds.values()}
    if not rates:
        return None
    shared = sorted(set.intersection(*(set(s) for s in rates.values())))
    if not shared:
        return None
    scored = {name: statistics.fmean(seeds[s] for s in shared) for name, seeds in rates.items()}
    name = min(scored, key=lambda n: (scored[n], n))
    lr = VARIANTS_BY_NAME[name].changes.get("lr", RECIPE["lr"])
    return {"variant": name, "lr": lr, "multiple": lr / RECIPE["lr"], "seeds": shared,
            "val_loss_mean": scored[name], "rates": sorted(rates)}


def _row(horizon: int, name: str, k: int, runs: list[dict]) -> dict[str, Any]:
    done = [r for r in runs if r["status"] == FINISHED]
    loss_mean, loss_std = mean_std([r["val_loss"] for r in done])
    variant = VARIANTS_BY_NAME[name]
    return {
        "horizon": horizon, "variant": name, "label": variant.label, "stages": k,
        "baseline": variant.baseline, "folder": runs[0]["name"].rsplit("/", 1)[0],
        "seeds": len(done), "seed_list": sorted(r["seed"] for r in done),
        "diverged": len(runs) - len(done), "val_loss_mean": loss_mean,
        "val_loss_std": loss_std,
        "val_bpb_mean": mean_std([r["val_bits_per_byte"] for r in done])[0],
        "lr": runs[0].get("lr"),
        "train_time_s_mean": mean_std([r["train_time_s"] for r in done])[0]}


def _gap_pct(loss: float | None, base: float | None) -> float | None:
    if loss is None or base is None:
        return None
    return 100.0 * (loss - base) / base


def _add_comparisons(rows: list[dict], best: dict[int, dict | None],
                     curves: dict[CurveKey, Curve]) -> None:
    """Each row's gap to its own baseline and to the best backprop of its horizon, and the
    iso-loss step ratio: steps to reach the best backprop's final loss / the horizon."""
    for row in rows:
        h, winner = row["horizon"], best[row["horizon"]]
        best_row = find(rows, h, winner["variant"], 1) if winner else None
        target = best_row["val_loss_mean"] if best_row else None
        own = best_row if row["baseline"] == BEST_BP else find(rows, h, row["baseline"], 1)
        row["gap_pct"] = _gap_pct(row["val_loss_mean"], own["val_loss_mean"] if own else None)
        row["gap_to_best_bp_pct"] = _gap_pct(row["val_loss_mean"], target)
        curve = curves.get((h, row["variant"], row["stages"]))
        steps = None if target is None or not curve else steps_to_reach(curve, target)
        row["iso_steps"] = steps
        row["iso_ratio"] = None if steps is None else steps / h
        row["target_reached"] = None if target is None or not curve else steps is not None


def summarise(outcomes: list[dict], plan: Any, curves: dict[CurveKey, Curve]) -> dict:
    """``summary.json``'s data from the finished runs' outcomes (each with ``horizon``,
    ``variant``, ``seed``, ``stages``, ``name``) and each cell's mean loss curve."""
    groups: dict[CurveKey, list[dict]] = {}
    for o in outcomes:
        groups.setdefault((o["horizon"], o["variant"], o["stages"]), []).append(o)
    rows = [_row(h, name, k, runs) for (h, name, k), runs in sorted(groups.items())]
    best = {h: best_backprop(outcomes, h) for h in plan.horizons}
    _add_comparisons(rows, best, curves)
    return {"rows": rows, "best_bp": {str(h): b for h, b in best.items()},
            "goal": goal(rows, plan),
            "diverged": sorted(o["name"] for o in outcomes if o["status"] != FINISHED)}


def _ddg_rows(rows: list[dict], horizon: int, k: int) -> list[dict]:
    return [r for r in rows_at(rows, horizon) if r["stages"] == k
            and r["gap_to_best_bp_pct"] is not None and not r["diverged"]]


def goal(rows: list[dict], plan: Any) -> dict:
    """At the longest horizon with DDG runs: per K the DDG variant closest to the best
    backprop, the one variant whose worst K is best (the recommendation), and whether it
    is within the tolerance at every K."""
    trained = [h for h in sorted(plan.horizons) if any(r["stages"] > 1
                                                       for r in rows_at(rows, h))]
    if not trained:
        return {"horizon": None}
    horizon = trained[-1]
    per_k = {}
    for k in plan.stage_counts:
        found = _ddg_rows(rows, horizon, k)
        leader = min(found, key=lambda r: r["gap_to_best_bp_pct"], default=None)
        per_k[k] = leader and {"variant": leader["variant"],
                               "gap_pct": leader["gap_to_best_bp_pct"]}
    worst: dict[str, float] = {}
    for name in dict.fromkeys(r["variant"] for r in rows_at(rows, horizon) if r["stages"] > 1):
        gaps = [next((r["gap_to_best_bp_pct"] for r in _ddg_rows(rows, horizon, k)
                      if r["variant"] == name), None) for k in plan.stage_counts]
        if None not in gaps:
            worst[name] = max(g for g in gaps if g is not None)
    recommended = min(worst, key=lambda n: worst[n], default=None)
    return {"horizon": horizon, "per_k": {str(k): v for k, v in per_k.items()},
            "recommended": recommended,
            "recommended_worst_gap_pct": worst.get(recommended) if recommended else None,
            "met": None if recommended is None else worst[recommended] <= TOLERANCE_PCT}
