"""The horizon study's figures: the gap to the best backprop against the horizon (one panel
per K, log-x), and each horizon's held-out loss curves (mean over seeds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddgpipe.experiments.lm.curves import Curve
from ddgpipe.experiments.lm.summary import rows_at
from ddgpipe.training.plots import _save, plt

__all__ = ["make_figures"]


def _colours(names: list[str]) -> dict[str, str]:
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def plot_gap_vs_horizon(rows: list[dict], plan: Any, out_png: Path) -> Path | None:
    """Per K: each DDG variant's gap (%) to the best backprop of each horizon it ran at."""
    ddg = [r for r in rows if r["stages"] > 1 and r["gap_to_best_bp_pct"] is not None]
    if not ddg:
        return None
    colours = _colours(list(dict.fromkeys(r["variant"] for r in ddg)))
    ks = plan.stage_counts
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4.2), squeeze=False,
                             sharey=True)
    for ax, k in zip(axes[0], ks, strict=True):
        for name, colour in colours.items():
            points = sorted((r["horizon"], r["gap_to_best_bp_pct"]) for r in ddg
                            if r["variant"] == name and r["stages"] == k)
            if points:
                label = next(r["label"] for r in ddg if r["variant"] == name)
                ax.plot(*zip(*points, strict=True), color=colour, marker="o", label=label)
        ax.axhline(1.0, color="black", ls=":", lw=1, label="goal: 1%")
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set_xscale("log")
        ax.set_xticks(list(plan.horizons), [str(h) for h in plan.horizons])
        ax.minorticks_off()
        ax.set(xlabel="iterations (horizon)", title=f"K = {k}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out loss above the best backprop (%)")
    fig.suptitle("gap to the best-tuned backprop against the training horizon")
    return _save(fig, out_png)


def plot_horizon_curves(rows: list[dict], best: dict | None, horizon: int, plan: Any,
                        curves: dict[tuple[int, str, int], Curve], out_png: Path) -> Path | None:
    """One horizon: per K, every DDG variant's mean held-out loss against iterations, with
    the best backprop dashed."""
    here = rows_at(rows, horizon)
    if not any(r["stages"] > 1 for r in here):
        return None
    colours = _colours(list(dict.fromkeys(r["variant"] for r in here if r["stages"] > 1)))
    bp_curve = curves.get((horizon, best["variant"], 1)) if best else None
    ks = plan.stage_counts
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4.2), squeeze=False,
                             sharey=True)
    for ax, k in zip(axes[0], ks, strict=True):
        if bp_curve and best:
            ax.plot(*bp_curve, color="black", ls="--", label=f"best BP ({best['variant']})")
        for row in (r for r in here if r["stages"] == k):
            curve = curves.get((horizon, row["variant"], k))
            if curve and curve[0]:
                ax.plot(*curve, color=colours[row["variant"]], label=row["label"])
        ax.set(xlabel="iteration", title=f"K = {k}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out loss (nats per byte, mean over seeds)")
    fig.suptitle(f"{horizon} iterations")
    return _save(fig, out_png)


def make_figures(plan: Any, summary: dict, curves: dict[tuple[int, str, int], Curve],
                 out: Path) -> list[Path]:
    """Every figure the runs so far allow; the report embeds them."""
    rows = summary["rows"]
    figures = [plot_gap_vs_horizon(rows, plan, out / "gap-horizon.png")]
    for horizon in sorted(plan.horizons):
        best = summary["best_bp"].get(str(horizon))
        figures.append(plot_horizon_curves(rows, best, horizon, plan, curves,
                                           out / f"loss-h{horizon}.png"))
    return [f for f in figures if f is not None]
