"""``ddgpipe experiment staleness``: do the staleness compensations close DDG's momentum gap?

Why and how: ``docs/design.md``, "The staleness experiment".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ddgpipe.errors import UsageError
from ddgpipe.experiments.common import microbatching_available
from ddgpipe.experiments.paper import SETTINGS
from ddgpipe.training import TrainConfig

__all__ = ["Benchmark", "Variant", "GridRun", "StalenessPlan", "BENCHMARKS", "QUICK_BENCHMARKS",
           "MAIN_VARIANTS", "PARTS", "GRAD_SHRINK", "GRAD_SHRINK_WHY", "staleness_plan",
           "plan_record"]

#: the optimizer of every run: ``experiment paper``'s momentum SGD (lr 0.05, cosine, one
#: warm-up epoch at 0.1x, weight decay 5e-4, momentum 0.9)
RECIPE = SETTINGS["momentum"]
BASE_LR = RECIPE["lr"]

#: FDG's gradient-shrinking factor beta (stage k's delayed gradient times beta**delay)
GRAD_SHRINK = 0.5
GRAD_SHRINK_WHY = (
    "FDG's gradient shrinking uses beta = 0.5 at every K. Zhuang et al. (Fully Decoupled Neural "
    "Network Learning Using Delayed Gradients, 2019) tune beta per network and K: their public "
    "code's README reports ResNet-56 on CIFAR-10 best at beta = 0.5 for K = 2, 0.2 for K = 3 "
    "and 0.3 for K = 4, and 0.2-0.8 for other networks at K = 2. No method is retuned per K "
    "here, so one beta for every K: 0.5, their ResNet-56 value at K = 2 and the value they "
    "report most often.")
BUDGET_FACTOR = 3
#: the budget part's K values and how many of the plan's seeds (the first ones) it trains
BUDGET_STAGES = (4,)
BUDGET_SEEDS = 1
PARTS = ("main", "sweep", "budget")


@dataclass(frozen=True)
class Benchmark:
    """A network, a data set and a training length; the batch and recipe are shared."""

    name: str
    model: str
    data: str
    epochs: int
    batch_size: int = 64
    note: str = ""


BENCHMARKS = {
    "digits": Benchmark(
        "digits", "resnet56", "digits", 15,
        note="ResNet-56 on the embedded 8x8 digits, as `experiment paper` (15 epochs)"),
    # ResNet-20-1D: backprop reaches 98.8% in 30 epochs at about 50 s on one core; its 11
    # cuttable blocks (stem, 9 residual blocks, head) leave room for K = 8 (1-2 blocks per
    # stage). ResNet-56-1D would triple the cost (2.5 min a run) for a grid of hundreds.
    "mnist1d": Benchmark(
        "mnist1d", "resnet1d-20", "mnist1d", 30,
        note="ResNet-20-1D on MNIST-1D (4000 train / 4000 test signals), 30 epochs"),
}
QUICK_BENCHMARKS = {  # one epoch (all of it the warm-up): a smoke test, not a result
    "digits": Benchmark("digits", "resnet20", "digits", 1, 128, note="smoke test"),
    "mnist1d": Benchmark("mnist1d", "resnet1d-20", "mnist1d", 1, 128, note="smoke test"),
}


@dataclass(frozen=True)
class Variant:
    """One way of training: a method, its compensation, and how it differs from backprop's
    recipe (learning rate, epochs); ``baseline`` is the backprop variant it is compared to."""

    name: str  # its runs' folder: BENCHMARK/NAME/kK-sSEED
    label: str
    method: str = "ddg"
    compensation: str | None = None
    grad_shrink: float = 1.0
    lr: float = BASE_LR
    epochs_factor: int = 1
    baseline: str = "bp"
    microbatches: int = 1  # microbatched DDG: M microbatches of B/M per optimizer step
    stages: tuple[int, ...] | None = None  # the K it runs at (None: every K of the plan)

    def runs_at(self, k: int) -> bool:
        return self.stages is None or k in self.stages


MAIN_VARIANTS = (
    Variant("bp", "BP", "bp"),
    Variant("ddg", "DDG"),
    Variant("ddg+sc", "DDG + sc", compensation="sc"),
    Variant("ddg+lwp", "DDG + lwp", compensation="lwp"),
    Variant("ddg+dc", "DDG + dc", compensation="dc"),
    Variant("ddg+pipemare-lr", "DDG + pipemare-lr", compensation="pipemare-lr"),
    Variant("ddg+sc+lwp", "DDG + sc,lwp", compensation="sc,lwp"),
    Variant(f"ddg+shrink{GRAD_SHRINK:g}", f"DDG + shrink {GRAD_SHRINK:g} (FDG)",
            grad_shrink=GRAD_SHRINK),
    Variant("fr", "FR", "fr"),
    Variant("fr+pipemare", "FR + pipemare", "fr", compensation="pipemare"),
    Variant("ddg+delay-lr", "DDG + delay-lr", compensation="delay-lr"),
    Variant("ddg+accumulate", "DDG + accumulate 4", compensation="accumulate"),
    Variant("ddg+stage-momentum", "DDG + stage-momentum", compensation="stage-momentum"),
    # microbatched DDG at the grid's batch (64: M = 4 and 8 divide it), where the delay of
    # K = 4 and 8 is longest: a stage's gradient is then at most ceil(delay / M) steps stale
    Variant("ddg-m4", "DDG M=4", microbatches=4, stages=(4, 8)),
    Variant("ddg-m8", "DDG M=8", microbatches=8, stages=(4, 8)),
)
VARIANTS_BY_NAME = {v.name: v for v in MAIN_VARIANTS}


def default_variants() -> tuple[str, ...]:
    """Every main variant this ddgpipe can train (microbatched DDG is merged separately)."""
    available = microbatching_available()
    return tuple(v.name for v in MAIN_VARIANTS if available or v.microbatches == 1)


def sweep_variant(lr: float) -> Variant:
    """Plain DDG at ``lr``; at backprop's rate it is the main part's plain DDG (same runs)."""
    return VARIANTS_BY_NAME["ddg"] if lr == BASE_LR else Variant(f"ddg-lr{lr:g}",
                                                                  f"DDG lr {lr:g}", lr=lr)


def budget_variants(factor: int) -> tuple[Variant, Variant]:
    return (Variant(f"bp-{factor}x", f"BP {factor}x epochs", "bp", epochs_factor=factor,
                    baseline=f"bp-{factor}x"),
            Variant(f"ddg-{factor}x", f"DDG {factor}x epochs", epochs_factor=factor,
                    baseline=f"bp-{factor}x"))


@dataclass(frozen=True)
class GridRun:
    """One run of the grid: where it sits in the report, and its training config."""

    name: str  # BENCHMARK/VARIANT/kK-sSEED, relative to the output folder
    benchmark: str
    variant: Variant
    stages: int
    seed: int
    config: TrainConfig = field(compare=False)


@dataclass
class StalenessPlan:
    benchmarks: tuple[str, ...] = tuple(BENCHMARKS)
    stage_counts: tuple[int, ...] = (2, 3, 4, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    parts: tuple[str, ...] = PARTS
    variants: tuple[str, ...] = field(default_factory=default_variants)  # the main part's
    sweep_lrs: tuple[float, ...] = (BASE_LR, BASE_LR / 2, BASE_LR / 4)
    budget_factor: int = BUDGET_FACTOR
    budget_stages: tuple[int, ...] = BUDGET_STAGES
    budget_seeds: int = BUDGET_SEEDS
    quick: bool = False
    workers: int = 2

    def benchmark(self, name: str) -> Benchmark:
        return (QUICK_BENCHMARKS if self.quick else BENCHMARKS)[name]

    def validate(self) -> None:
        """Fail in one line, before any run starts, on anything the grid cannot train."""
        from ddgpipe.models import build_model

        for name, allowed, given in (("--benchmarks", BENCHMARKS, self.benchmarks),
                                     ("--parts", PARTS, self.parts)):
            unknown = [g for g in given if g not in allowed]
            if unknown or not given:
                raise UsageError(f"{name} takes a comma-separated subset of "
                                 f"{','.join(allowed)} (got {','.join(given) or 'nothing'})")
        for variant in self.variants:
            if variant not in VARIANTS_BY_NAME:
                raise UsageError(f"unknown variant {variant!r}; choose from "
                                 f"{', '.join(VARIANTS_BY_NAME)}")
        if not self.seeds:
            raise UsageError("--seeds needs at least one seed")
        if "budget" in self.parts and not 1 <= self.budget_seeds <= len(self.seeds):
            raise UsageError(f"--budget-seeds must be between 1 and the number of seeds "
                             f"({len(self.seeds)}); got {self.budget_seeds}")
        for flag, values in (("--seeds", self.seeds), ("--stages", self.stage_counts),
                             ("--budget-stages", self.budget_stages)):
            if len(set(values)) != len(values):
                raise UsageError(f"{flag} names a value twice (got {list(values)}); give each "
                                 "once")
        for flag, ks in (("--stages", self.stage_counts), ("--budget-stages",
                                                            self.budget_stages)):
            if not ks or any(k < 2 for k in ks):
                raise UsageError(f"{flag} must all be >= 2 (got {list(ks)}); backprop "
                                 "(K = 1) is always run")
        if self.workers < 1:
            raise UsageError(f"--workers must be >= 1 (got {self.workers})")
        self._validate_microbatches()
        for name in self.benchmarks:
            bench = self.benchmark(name)
            blocks = len(build_model(bench.model))  # the cuttable entries of its stack
            if max(self.stage_counts + self.budget_stages) > blocks:
                raise UsageError(f"K = {max(self.stage_counts + self.budget_stages)} does not "
                                 f"fit {bench.model} "
                                 f"({name}): it has {blocks} blocks to cut between; use "
                                 f"--stages up to {blocks}")

    def _validate_microbatches(self) -> None:
        micro = [VARIANTS_BY_NAME[v] for v in self.variants if VARIANTS_BY_NAME[v].microbatches > 1]
        if micro and not microbatching_available():
            raise UsageError(f"{', '.join(v.name for v in micro)} need microbatched DDG, which "
                             "this ddgpipe lacks: leave them out of --variants")
        for variant in micro:
            for name in self.benchmarks:
                batch = self.benchmark(name).batch_size
                if batch % variant.microbatches:
                    raise UsageError(f"{variant.name}: {variant.microbatches} microbatches do "
                                     f"not divide {name}'s batch of {batch}")

    def part_variants(self, part: str) -> list[Variant]:
        """The variants a part needs (backprop included where its gaps are measured)."""
        if part == "main":  # backprop first: every gap is measured against it
            return [VARIANTS_BY_NAME["bp"], *(VARIANTS_BY_NAME[v] for v in self.variants
                                              if v != "bp")]
        if part == "sweep":
            return [VARIANTS_BY_NAME["bp"], *(sweep_variant(lr) for lr in self.sweep_lrs)]
        bp, ddg = VARIANTS_BY_NAME["bp"], VARIANTS_BY_NAME["ddg"]
        return [bp, ddg, *budget_variants(self.budget_factor)]

    def part_scope(self, part: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The seeds and K values a part trains."""
        if part == "budget":
            return self.seeds[:self.budget_seeds], self.budget_stages
        return self.seeds, self.stage_counts

    def runs(self, out: str | Path) -> list[GridRun]:
        """Every run once, in the order a partial grid is most useful: part by part, seed by
        seed, backprop before the methods of each seed."""
        out = Path(out)
        runs: dict[str, GridRun] = {}
        for part in self.parts:
            seeds, stage_counts = self.part_scope(part)
            for seed in seeds:
                for bench_name in self.benchmarks:
                    bench = self.benchmark(bench_name)
                    for variant in self.part_variants(part):
                        for k in [1] if variant.method == "bp" else [
                                k for k in stage_counts if variant.runs_at(k)]:
                            name = f"{bench_name}/{variant.name}/k{k}-s{seed}"
                            if name not in runs:
                                runs[name] = GridRun(name, bench_name, variant, k, seed,
                                                     self._config(bench, variant, k, seed,
                                                                  out / name))
        return list(runs.values())

    @staticmethod
    def _config(bench: Benchmark, variant: Variant, k: int, seed: int, out: Path) -> TrainConfig:
        micro = {"microbatches": variant.microbatches} if variant.microbatches > 1 else {}
        return TrainConfig.from_flat(
            model=bench.model, data=bench.data, method=variant.method, stages=k, **micro,
            compensation=variant.compensation, grad_shrink=variant.grad_shrink,
            epochs=bench.epochs * variant.epochs_factor, batch_size=bench.batch_size,
            seed=seed, balance="params", executor="reference", threads=1, progress=False,
            out=str(out), **(RECIPE | {"lr": variant.lr}))


def staleness_plan(quick: bool = False) -> StalenessPlan:
    """The full grid, or a smoke version (one seed, K = 2 and 4, three variants, small
    models, one epoch; two for the budget part) that the test suite runs."""
    if quick:
        return StalenessPlan(stage_counts=(2, 4), seeds=(0,), quick=True,
                             variants=("bp", "ddg", "ddg+sc+lwp"),
                             sweep_lrs=(BASE_LR, BASE_LR / 2), budget_factor=2,
                             budget_stages=(2, 4))
    return StalenessPlan()


def plan_record(plan: StalenessPlan) -> dict:
    """The plan as data: its fields, and the benchmarks and variants it resolves to."""
    variants = {v.name: v for part in plan.parts for v in plan.part_variants(part)}
    return dataclasses.asdict(plan) | {
        "recipe": RECIPE, "grad_shrink": GRAD_SHRINK,
        "benchmark_specs": {b: dataclasses.asdict(plan.benchmark(b)) for b in plan.benchmarks},
        "variant_specs": {name: dataclasses.asdict(v) for name, v in variants.items()},
    }
