"""``ddgpipe experiment lm``: how far is DDG from the best-tuned backprop on a transformer
language model, and does the gap shrink as training gets longer?

A GPT (:data:`MODEL`, :data:`SHAPE`) learns the Shakespeare corpus (byte tokens) at several
horizons (800, 3200, 12800 iterations of batch 16), each with its own warm-up (a tenth of the
run) and cosine. At each horizon backprop with AdamW is swept over learning rates; the DDG
variants then train at the best rate found (two phases: the sweep first). The longest
horizons run only ``long_variants``, the methods that led at the shorter ones. Variants:
:mod:`ddgpipe.experiments.lm.variants`. Runs: ``[hH/]VARIANT/kK-sSEED`` (800 at the top).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ddgpipe.errors import UsageError
from ddgpipe.experiments.common import microbatching_available
from ddgpipe.experiments.lm.variants import (
    BEST_BP,
    RECIPE,
    VARIANTS_BY_NAME,
    Variant,
    run_folder,
)
from ddgpipe.training import TrainConfig

__all__ = ["GridRun", "LMPlan", "lm_plan", "plan_record", "MODEL", "SHAPE", "RECIPE",
           "QUICK_SHAPE", "DEFAULT_VARIANTS", "DEFAULT_LONG_VARIANTS", "CORE_MINUTES_PER_800"]

MODEL = "gpt-8"
#: width 128 keeps a run near 7 minutes on one core of the reference machine (800 steps of
#: 16 x 128 tokens at about 4,000 tokens/s); dropout 0: less than one pass over the corpus
SHAPE = {"width": 128, "heads": 4, "context": 128, "dropout": 0.0}
QUICK_SHAPE = {"width": 32, "heads": 2, "context": 32, "dropout": 0.0}
QUICK_RECIPE = RECIPE | {"batch_size": 4, "iterations": 12, "warmup_iters": 2, "eval_every": 6}
EVAL_EVERY = 100
#: one run's cost on one core of the reference machine, per 800 iterations (measured: about
#: 7 minutes at 800, 28 at 3200); the plan's estimate scales it with the horizon
CORE_MINUTES_PER_800 = 7.0

#: the measured grid: backprop's rates, DDG at rates of its own with and without microbatches
#: and Adam weight prediction, AsyncPP's recipe, Muon
DEFAULT_VARIANTS = ("bp-lr0.5", "bp", "bp-lr2", "bp-lr4", "bp-lr8", "ddg-lr2", "ddg-m2-lr2",
                    "ddg-m4-lr1", "ddg-m4-lr2", "ddg-m4-lr4", "ddg-m8-lr1", "ddg-m8-lr2",
                    "ddg-m4-lr2+wp", "ddg-m4-lr4+wp", "ddg-m8-lr1+wp", "ddg-m8-lr2+wp",
                    "bp-asyncpp", "asyncpp", "asyncpp-m4", "bp-muon", "ddg-muon")
#: the longest horizon's methods: those that lead at 3200 (microbatched DDG with wp at its
#: own rate), with three backprop rates around the best at 3200 (8e-3)
DEFAULT_LONG_VARIANTS = ("bp-lr4", "bp-lr8", "bp-lr16", "ddg-m4-lr4+wp", "ddg-m8-lr2+wp")


@dataclass(frozen=True)
class GridRun:
    name: str  # [hH/]FOLDER/kK-sSEED, relative to the output folder
    variant: Variant
    horizon: int
    stages: int
    seed: int
    config: TrainConfig = field(compare=False)


@dataclass
class LMPlan:
    horizons: tuple[int, ...] = (800, 3200, 12800)
    stage_counts: tuple[int, ...] = (2, 4, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    #: how many of ``seeds`` (the first ones) a horizon trains; a horizon not named: all
    seed_counts: dict[int, int] = field(default_factory=lambda: {3200: 1, 12800: 2})
    variants: tuple[str, ...] = field(default_factory=lambda: _buildable(DEFAULT_VARIANTS))
    long_variants: tuple[str, ...] = field(
        default_factory=lambda: _buildable(DEFAULT_LONG_VARIANTS))
    long_from: int = 12800  # horizons from this one on train ``long_variants`` only
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

    def variants_at(self, horizon: int) -> tuple[str, ...]:
        return self.long_variants if horizon >= self.long_from else self.variants

    def seeds_at(self, horizon: int) -> tuple[int, ...]:
        return self.seeds[:self.seed_counts.get(horizon, len(self.seeds))]

    def stages_of(self, variant: Variant) -> list[int]:
        if variant.method == "bp":
            return [1]
        return [k for k in self.stage_counts if variant.stages is None or k in variant.stages]

    def horizon_settings(self, horizon: int) -> dict:
        """The recipe at a horizon: its length, a warm-up of a tenth of it, and evals."""
        eval_every = max(1, horizon // 2) if self.quick else EVAL_EVERY
        return self.recipe | {"iterations": horizon, "warmup_iters": max(1, horizon // 10),
                              "eval_every": eval_every}

    def horizon_folder(self, horizon: int) -> str:
        """Where a horizon's runs go: the recipe's own length at the top, others in hH/."""
        return "" if horizon == self.recipe["iterations"] else f"h{horizon}/"

    def validate(self) -> None:
        """Fail in one line, before any run starts, on anything the grid cannot train."""
        for flag, names in (("--variants", self.variants), ("--long-variants",
                                                             self.long_variants)):
            unknown = [v for v in names if v not in VARIANTS_BY_NAME]
            if unknown:
                raise UsageError(f"{flag}: unknown variant {unknown[0]!r}; choose from "
                                 f"{', '.join(VARIANTS_BY_NAME)}")
        for horizon in self.horizons:
            _check_baselines(self.variants_at(horizon), horizon)
        if not microbatching_available():
            needs = [v for v in self.all_variants() if VARIANTS_BY_NAME[v].microbatches > 1]
            if needs:
                raise UsageError(f"variants {', '.join(needs)} need microbatched DDG, which "
                                 "this ddgpipe lacks: leave them out of --variants")
        self._validate_numbers()

    def _validate_numbers(self) -> None:
        for flag, values in (("--horizons", self.horizons), ("--seeds", self.seeds),
                             ("--stages", self.stage_counts)):
            if not values or len(set(values)) != len(values):
                raise UsageError(f"{flag} needs distinct values (got {list(values)})")
        if any(h < 2 for h in self.horizons):
            raise UsageError(f"--horizons are iteration counts >= 2 (got {list(self.horizons)})")
        blocks = int(self.model.removeprefix("gpt-")) + 2
        if any(not 2 <= k <= blocks for k in self.stage_counts):
            raise UsageError(f"--stages must be between 2 and {blocks}, the blocks of "
                             f"{self.model} (got {list(self.stage_counts)}); backprop is "
                             "always run")
        if any(n < 1 for n in self.seed_counts.values()):
            raise UsageError(f"every horizon needs at least one seed (got {self.seed_counts})")
        if self.workers < 1:
            raise UsageError(f"--workers must be >= 1 (got {self.workers})")

    def all_variants(self) -> list[str]:
        return list(dict.fromkeys(v for h in self.horizons for v in self.variants_at(h)))

    def runs(self, out: str | Path, multiples: dict[int, float | None],
             bp_only: bool = False) -> list[GridRun]:
        """Every run whose settings are known, horizon by horizon (shortest first), seed by
        seed, backprop first. A tuned variant's runs need their horizon's best backprop rate
        (``multiples[H]``, times the recipe's): without it they are left out."""
        out = Path(out)
        runs = []
        for horizon in sorted(self.horizons):
            multiple = multiples.get(horizon)
            for seed in self.seeds_at(horizon):
                for name in _bp_first(self.variants_at(horizon)):
                    variant = VARIANTS_BY_NAME[name]
                    if (bp_only and variant.method != "bp") or (variant.tuned and
                                                                multiple is None):
                        continue
                    folder = self.horizon_folder(horizon) + run_folder(variant, multiple)
                    for k in self.stages_of(variant):
                        run = f"{folder}/k{k}-s{seed}"
                        config = self._config(variant, horizon, multiple, k, seed, out / run)
                        runs.append(GridRun(run, variant, horizon, k, seed, config))
        return runs

    def _config(self, variant: Variant, horizon: int, multiple: float | None, k: int,
                seed: int, out: Path) -> TrainConfig:
        settings = self.horizon_settings(horizon) | variant.changes
        if variant.tuned and multiple is not None:
            settings["lr"] = self.recipe["lr"] * multiple
        return TrainConfig.from_flat(
            model=self.model, data="shakespeare", method=variant.method, stages=k,
            compensation=variant.compensation, compensation_options=variant.options,
            seed=seed, balance="params", executor="reference", threads=1, progress=False,
            epochs=1, out=str(out), **self.shape, **settings)

    def estimated_core_minutes(self, runs: list[GridRun]) -> float:
        """What ``runs`` cost on one core of the reference machine, roughly."""
        return CORE_MINUTES_PER_800 * sum(r.horizon for r in runs) / 800


def _buildable(names: tuple[str, ...]) -> tuple[str, ...]:
    """The default variants this ddgpipe can train: without microbatched DDG (merged
    separately) its variants are left out rather than refused."""
    if microbatching_available():
        return names
    return tuple(n for n in names if VARIANTS_BY_NAME[n].microbatches == 1)


def _bp_first(names: tuple[str, ...]) -> list[str]:
    return sorted(names, key=lambda n: VARIANTS_BY_NAME[n].method != "bp")


def _check_baselines(names: tuple[str, ...], horizon: int) -> None:
    """Each variant's backprop must train at the same horizon."""
    for name in names:
        baseline = VARIANTS_BY_NAME[name].baseline
        if baseline == BEST_BP:
            if not any(VARIANTS_BY_NAME[n].sweep for n in names):
                raise UsageError(f"{name} trains at the best AdamW backprop rate at {horizon} "
                                 "iterations, but no backprop rate (bp, bp-lr2, ...) trains "
                                 "there: add one to the variants")
        elif baseline not in names:
            raise UsageError(f"{name} is measured against {baseline}, which does not train at "
                             f"{horizon} iterations: add it to the variants")


def lm_plan(quick: bool = False) -> LMPlan:
    """The full grid, or a smoke version (a tiny GPT, one seed, K = 2, horizons of 12 and 24
    steps, two backprop rates and plain DDG) that the test suite runs."""
    if quick:
        return LMPlan(horizons=(12, 24), stage_counts=(2,), seeds=(0,), seed_counts={},
                      quick=True, variants=("bp", "bp-lr2", "ddg", "bp-muon", "ddg-muon"),
                      long_variants=("bp", "bp-lr2", "ddg"), long_from=24)
    return LMPlan()


def plan_record(plan: LMPlan, resolved: dict | None = None) -> dict:
    """The plan as data, with each horizon's resolved learning rate for the tuned variants."""
    return dataclasses.asdict(plan) | {
        "model": plan.model, "shape": plan.shape, "recipe": plan.recipe,
        "horizon_settings": {h: plan.horizon_settings(h) for h in plan.horizons},
        "variant_specs": {v: dataclasses.asdict(VARIANTS_BY_NAME[v])
                          for v in plan.all_variants()},
        "resolved_lr": resolved or {}}
