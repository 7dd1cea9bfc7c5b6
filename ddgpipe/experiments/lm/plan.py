"""``ddgpipe experiment lm``: how far is DDG from backprop on a transformer language model, and
which remedy closes the gap?

A GPT (:data:`MODEL`, :data:`SHAPE`) learns the Shakespeare corpus (byte tokens) with AdamW
and backprop's recipe (:data:`RECIPE`) unchanged for every method and K: backprop; plain
DDG; plain DDG at lower learning rates (the baseline a remedy must beat: DDG at its best
swept rate); DDG with each compensation that applies to Adam-family optimizers (dc,
pipemare-lr, delay-lr, accumulate, stage-momentum); and two optimizers reported to tolerate
delay: NAdam with beta1 = 0.99 (Ajanthan et al. 2025's method) and Muon. Each optimizer's
DDG runs are compared with backprop under the same optimizer and with backprop under
AdamW. K = 2, 4 and 8 (one block per stage at K = 8), several seeds, the same tokens for all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddgpipe.errors import UsageError
from ddgpipe.training import TrainConfig

__all__ = ["Variant", "GridRun", "LMPlan", "lm_plan", "plan_record", "MODEL", "SHAPE",
           "RECIPE", "VARIANTS", "VARIANTS_BY_NAME", "QUICK_SHAPE"]

MODEL = "gpt-8"
#: width 128 keeps a run near 5 minutes on one core of the reference machine (800 steps of
#: 16 x 128 tokens at about 5,000 tokens/s); dropout 0: less than one pass over the corpus
SHAPE = {"width": 128, "heads": 4, "context": 128, "dropout": 0.0}
QUICK_SHAPE = {"width": 32, "heads": 2, "context": 32, "dropout": 0.0}
RECIPE: dict[str, Any] = {
    "optimizer": "adamw", "lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1,
    "batch_size": 16, "iterations": 800, "warmup_iters": 80, "clip_grad": 1.0,
    "lr_schedule": "cosine", "eval_every": 100}
QUICK_RECIPE = RECIPE | {"batch_size": 4, "iterations": 12, "warmup_iters": 2, "eval_every": 6}


@dataclass(frozen=True)
class Variant:
    """A way of training, and the backprop variant it is measured against (``baseline``:
    backprop with the same optimizer)."""

    name: str  # its runs' folder: NAME/kK-sSEED
    label: str
    method: str = "ddg"
    compensation: str | None = None
    options: dict | None = None  # compensation options
    changes: dict = field(default_factory=dict)  # what differs from RECIPE
    baseline: str = "bp"


VARIANTS = (
    Variant("bp", "BP", "bp"),
    Variant("bp-nadam", "BP NAdam b1=0.99", "bp",
            changes={"optimizer": "nadam", "beta1": 0.99}, baseline="bp-nadam"),
    Variant("bp-muon", "BP Muon", "bp", changes={"optimizer": "muon"}, baseline="bp-muon"),
    Variant("ddg", "DDG"),
    Variant("ddg-lr0.5", "DDG lr x0.5", changes={"lr": RECIPE["lr"] / 2}),
    Variant("ddg-lr0.25", "DDG lr x0.25", changes={"lr": RECIPE["lr"] / 4}),
    Variant("ddg+dc", "DDG + dc", compensation="dc"),
    Variant("ddg+pipemare-lr", "DDG + pipemare-lr", compensation="pipemare-lr",
            options={"pipemare_anneal": 200}),
    Variant("ddg+delay-lr", "DDG + delay-lr", compensation="delay-lr"),
    Variant("ddg+accumulate", "DDG + accumulate 4", compensation="accumulate"),
    Variant("ddg+stage-momentum", "DDG + stage-momentum", compensation="stage-momentum"),
    Variant("ddg-nadam", "DDG NAdam b1=0.99 (Ajanthan et al.)",
            changes={"optimizer": "nadam", "beta1": 0.99}, baseline="bp-nadam"),
    Variant("ddg-muon", "DDG Muon", changes={"optimizer": "muon"}, baseline="bp-muon"),
)
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}
SWEEP = ("ddg", "ddg-lr0.5", "ddg-lr0.25")  # plain DDG's rates: its best is the bar


@dataclass(frozen=True)
class GridRun:
    name: str  # VARIANT/kK-sSEED, relative to the output folder
    variant: Variant
    stages: int
    seed: int
    config: TrainConfig = field(compare=False)


@dataclass
class LMPlan:
    stage_counts: tuple[int, ...] = (2, 4, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = tuple(VARIANTS_BY_NAME)
    quick: bool = False
    workers: int = 2

    @property
    def shape(self) -> dict:
        return QUICK_SHAPE if self.quick else SHAPE

    @property
    def model(self) -> str:
        return "gpt-2" if self.quick else MODEL

    @property
    def recipe(self) -> dict:
        return QUICK_RECIPE if self.quick else RECIPE

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS_BY_NAME]
        if unknown:
            raise UsageError(f"unknown variant {unknown[0]!r}; choose from "
                             f"{', '.join(VARIANTS_BY_NAME)}")
        needed = {VARIANTS_BY_NAME[v].baseline for v in self.variants}
        missing = sorted(needed - set(self.variants))
        if missing:
            raise UsageError(f"variants {', '.join(missing)} are the baselines of others "
                             "asked for: add them to --variants")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"--seeds needs distinct seeds (got {list(self.seeds)})")
        blocks = int(self.model.removeprefix("gpt-")) + 2
        bad = [k for k in self.stage_counts if not 2 <= k <= blocks]
        if bad or not self.stage_counts:
            raise UsageError(f"--stages must be between 2 and {blocks}, the blocks of "
                             f"{self.model} (got {list(self.stage_counts)}); backprop is "
                             "always run")
        if self.workers < 1:
            raise UsageError(f"--workers must be >= 1 (got {self.workers})")

    def runs(self, out: str | Path) -> list[GridRun]:
        """Every run, seed by seed, backprop first (a partial grid is then readable)."""
        out = Path(out)
        runs = []
        for seed in self.seeds:
            for name in self.variants:
                variant = VARIANTS_BY_NAME[name]
                for k in [1] if variant.method == "bp" else self.stage_counts:
                    run = f"{name}/k{k}-s{seed}"
                    runs.append(GridRun(run, variant, k, seed,
                                        self._config(variant, k, seed, out / run)))
        return runs

    def _config(self, variant: Variant, k: int, seed: int, out: Path) -> TrainConfig:
        settings = self.recipe | variant.changes
        return TrainConfig.from_flat(
            model=self.model, data="shakespeare", method=variant.method, stages=k,
            compensation=variant.compensation, compensation_options=variant.options,
            seed=seed, balance="params", executor="reference", threads=1, progress=False,
            epochs=1, out=str(out), **self.shape, **settings)


def lm_plan(quick: bool = False) -> LMPlan:
    """The full grid, or a smoke version (a tiny GPT, one seed, K = 2, a few variants, a
    dozen steps) that the test suite runs."""
    if quick:
        return LMPlan(stage_counts=(2,), seeds=(0,), quick=True,
                      variants=("bp", "ddg", "ddg-lr0.5", "ddg+dc"))
    return LMPlan()


def plan_record(plan: LMPlan) -> dict:
    return dataclasses.asdict(plan) | {
        "model": plan.model, "shape": plan.shape, "recipe": plan.recipe,
        "variant_specs": {v: dataclasses.asdict(VARIANTS_BY_NAME[v]) for v in plan.variants}}
