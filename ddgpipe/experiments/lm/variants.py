"""The ways of training the language-model study compares, each with the backprop it is
measured against and the K values it runs at.

A *tuned* variant has no learning rate of its own: at each horizon it trains at the rate of
the best AdamW backprop there (the lowest held-out loss of the ``sweep`` variants), so
that DDG is never measured against a backprop better tuned than itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ddgpipe.training.recipes import ASYNCPP

__all__ = ["Variant", "VARIANTS", "VARIANTS_BY_NAME", "RECIPE", "BEST_BP", "bp_rate",
           "run_folder"]

RECIPE: dict[str, Any] = {
    "optimizer": "adamw", "lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1,
    "batch_size": 16, "iterations": 800, "warmup_iters": 80, "clip_grad": 1.0,
    "lr_schedule": "cosine", "eval_every": 100}
#: a variant's ``baseline`` when it is measured against the best of the AdamW backprop sweep
BEST_BP = "best-bp"


@dataclass(frozen=True)
class Variant:
    """A way of training; ``baseline`` is the backprop it is measured against (:data:`BEST_BP`
    or a backprop variant with the same optimizer); ``stages`` the K it runs at (None: every
    K of the plan)."""

    name: str  # its runs' folder: NAME/kK-sSEED (a tuned one: NAME-lrX at X times RECIPE's)
    label: str
    method: str = "ddg"
    compensation: str | None = None
    options: dict | None = None  # compensation options
    changes: dict = field(default_factory=dict)  # what differs from the horizon's recipe
    baseline: str = BEST_BP
    stages: tuple[int, ...] | None = None
    tuned: bool = False  # trains at the best AdamW backprop's learning rate
    sweep: bool = False  # an AdamW backprop rate: the best of these is every tuned baseline

    @property
    def microbatches(self) -> int:
        return int(self.changes.get("microbatches", 1))


def bp_rate(multiple: float) -> Variant:
    """AdamW backprop at ``multiple`` times the recipe's learning rate (``bp`` at 1)."""
    name = "bp" if multiple == 1 else f"bp-lr{multiple:g}"
    label = "BP" if multiple == 1 else f"BP lr x{multiple:g}"
    changes = {} if multiple == 1 else {"lr": RECIPE["lr"] * multiple}
    return Variant(name, label, "bp", changes=changes, sweep=True)


def _ddg(name: str, label: str, microbatches: int = 1, stages: tuple[int, ...] | None = None,
         **kwargs: Any) -> Variant:
    changes = kwargs.pop("changes", {}) | ({"microbatches": microbatches}
                                           if microbatches > 1 else {})
    return Variant(name, label, changes=changes, stages=stages, tuned=True, **kwargs)


def _at_rate(name: str, label: str, multiple: float, microbatches: int = 1,
             stages: tuple[int, ...] | None = None, compensation: str | None = None) -> Variant:
    """DDG at ``multiple`` times the recipe's rate, fixed (not tuned): ``NAME-lrX``, with
    ``+COMPENSATION`` when it has one."""
    changes: dict[str, Any] = {"lr": RECIPE["lr"] * multiple}
    if microbatches > 1:
        changes["microbatches"] = microbatches
    plus = f"+{compensation}" if compensation else ""
    return Variant(f"{name}-lr{multiple:g}{plus}",
                   f"{label} lr x{multiple:g}" + (f" + {compensation}" if compensation else ""),
                   compensation=compensation, changes=changes, stages=stages)


_ASYNCPP = dict(ASYNCPP)
_BP_ASYNCPP = Variant("bp-asyncpp", "BP AsyncPP recipe", "bp", changes=_ASYNCPP,
                      baseline="bp-asyncpp")
_BP_MUON = Variant("bp-muon", "BP Muon", "bp", changes={"optimizer": "muon"},
                   baseline="bp-muon")

VARIANTS = (
    *(bp_rate(m) for m in (0.5, 1, 2, 4, 8, 16)),
    _BP_ASYNCPP,
    _BP_MUON,
    _ddg("ddg", "DDG"),
    _ddg("ddg-m2", "DDG M=2", 2, stages=(2,)),
    _ddg("ddg-m4", "DDG M=4", 4),
    _ddg("ddg-m8", "DDG M=8", 8, stages=(4, 8)),
    # DDG at a rate of its own (2x the recipe's), below the best backprop's when that is
    # higher: delayed gradients may not stand the rate backprop stands
    # and DDG's own rate swept (0.5 to 4x): the grid of issue 29's second phase
    *(_at_rate("ddg-m4", "DDG M=4", m, 4) for m in (0.5, 1, 2, 4)),
    *(_at_rate("ddg", "DDG", m) for m in (2, 4)),
    _at_rate("ddg-m2", "DDG M=2", 2, 2, stages=(2,)),
    *(_at_rate("ddg-m8", "DDG M=8", m, 8, stages=(4, 8)) for m in (1, 2)),
    _ddg("ddg+wp", "DDG + wp", compensation="wp"),
    # Adam weight prediction at DDG's own rates, with the microbatches that lead at each K
    *(_at_rate("ddg-m4", "DDG M=4", m, 4, compensation="wp") for m in (1, 2, 4)),
    *(_at_rate("ddg-m8", "DDG M=8", m, 8, stages=(4, 8), compensation="wp") for m in (1, 2)),
    _ddg("ddg-m4+wp", "DDG M=4 + wp", 4, compensation="wp"),
    _ddg("ddg+accumulate", "DDG + accumulate 4", compensation="accumulate"),
    # AsyncPP's own recipe (NAdam, its rate and schedule): not tuned, measured against
    # backprop under the same recipe and, in the gap table, against the best AdamW backprop
    Variant("asyncpp", "DDG AsyncPP recipe", changes=_ASYNCPP, baseline="bp-asyncpp"),
    Variant("asyncpp-m4", "DDG M=4 AsyncPP recipe", changes=_ASYNCPP | {"microbatches": 4},
            baseline="bp-asyncpp"),
    Variant("ddg-muon", "DDG Muon", changes={"optimizer": "muon"}, baseline="bp-muon"),
    # the 800-iteration study's remedies (docs/lm at RECIPE's rate), selectable by name
    _ddg("ddg+dc", "DDG + dc", compensation="dc"),
    _ddg("ddg+pipemare-lr", "DDG + pipemare-lr", compensation="pipemare-lr",
         options={"pipemare_anneal": 200}),
    _ddg("ddg+delay-lr", "DDG + delay-lr", compensation="delay-lr"),
    _ddg("ddg+stage-momentum", "DDG + stage-momentum", compensation="stage-momentum"),
)
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}


def run_folder(variant: Variant, multiple: float | None) -> str:
    """The folder of a variant's runs: its name, with ``-lrX`` when tuned to X times the
    recipe's rate (X = 1 keeps the bare name, so the runs of the recipe's rate are reused)."""
    if not variant.tuned or multiple is None or multiple == 1:
        return variant.name
    return f"{variant.name}-lr{multiple:g}"
