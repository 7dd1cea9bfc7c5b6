"""What the bench runs: the settings, the configuration names, and their validation.

Why and how: ``docs/design.md``, "The bench's configurations".
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ddgpipe.errors import UsageError
from ddgpipe.runtime.devices import cores_per_stage

if TYPE_CHECKING:
    from ddgpipe.core.compensation import CompensationSpec

__all__ = ["BenchConfig", "ConfigSpec", "CONFIG_NAMES", "BASELINE", "OPTIMIZERS",
           "compensation_spec", "config_names", "replica_names", "resolve"]

BASELINE = "bp-1t"
GPU_BASELINE = "bp-1gpu"
DDG_STASHES = ("graph", "recompute", "none")
DDG_EXECUTORS = ("threads", "processes")
_DDG_RE = re.compile(r"^ddg-(graph|recompute|none)-(threads|processes)$")
_PIPE_RE = re.compile(r"^(gpipe|1f1b|ddg)-m(\d+)$")
#: the rows fed M microbatches per step: torch's synchronous pipelines, microbatched DDG
MICROBATCHED = ("gpipe", "1f1b", "ddg")
_BP_RE = re.compile(r"^bp-(\d+)t$")
_REPLICAS_RE = re.compile(r"^ddg-(graph|recompute|none)-k(\d+)r(\d+)$")
COMPILED = "-compile"  # a name's suffix: the same configuration through torch.compile
COMPILABLE = ("bp", "ddg", "ddg-threads")
#: ROW+COMP: a DDG row with that staleness compensation (ddg-m4+wp); COMP names one or more,
#: by commas as --compensation takes them or by "+" (ddg-m4+sc+lwp; --configs splits at commas)
COMPENSATED = "+"
DDG_KINDS = ("ddg", "ddg-threads", "ddg-replicas")
#: the optimizer every row of one bench steps with (``BenchConfig.optimizer``): momentum SGD,
#: or the language-model study's AdamW recipe, so its wall clock times what the study trains
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"name": "SGD", "lr": 0.05, "momentum": 0.9},
    "adamw": {"name": "AdamW", "lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1},
}


@dataclass
class BenchConfig:
    """Settings shared by every configuration of one bench.

    ``stages`` is K, the number of workers (processes for ddp/pipelines/DDG, threads for
    ``bp-{K}t``); ``steps`` are timed after ``warmup`` untimed ones, in every one of
    ``rounds`` rounds; ``microbatches`` lists the M of ``gpipe-m{M}``/``1f1b-m{M}`` and of
    microbatched DDG, ``ddg-m{M}`` (processes, stash graph, the same batch);
    ``configs`` picks a subset of names (``bp-1t`` is always added: it is the baseline);
    ``timeout_s`` bounds each configuration run; ``replicas`` R > 1 adds the K x R rows;
    ``compile`` adds ``-compile`` twins of backprop and DDG (torch.compile, compiled in the
    warm-up steps); ``optimizer`` (a key of :data:`OPTIMIZERS`) is what every row steps with,
    so the rows stay comparable. A DDG row asked for as ``ROW+COMP`` (``ddg-m4+wp``) runs
    with that compensation, so its own cost is timed.
    """

    model: str = "resnet20"
    batch_size: int = 128
    stages: int = 2
    steps: int = 30
    warmup: int = 5
    rounds: int = 3
    microbatches: tuple[int, ...] = (2, 4, 8)
    configs: tuple[str, ...] | None = None  # subset of config names; None = all
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    seed: int = 0
    timeout_s: float = 600.0
    device: str = "cpu"  # or "cuda": every configuration on GPUs
    replicas: int = 1
    context: int = 128  # language models (gpt-L): tokens per sample
    width: int | None = None  # gpt-L: None is GPTConfig's
    compile: bool = False
    optimizer: str = "sgd"  # or "adamw": see OPTIMIZERS


def baseline(config: BenchConfig) -> str:
    """The configuration every ratio divides by: one-thread backprop, or backprop on a GPU."""
    return GPU_BASELINE if config.device != "cpu" else BASELINE


def gpu_count(config: BenchConfig) -> int:
    import torch

    return torch.cuda.device_count() if config.device != "cpu" else 0


@dataclass(frozen=True)
class ConfigSpec:
    """One configuration, resolved: what the workers build and how many of them."""

    name: str
    kind: str  # "bp", "ddp", "gpipe", "1f1b", "ddg" (processes), "ddg-threads",
    #            "ddg-replicas" (processes, K stages x R replicas)
    processes: int
    threads: int  # torch threads per process (per stage thread for ddg-threads)
    microbatches: int | None = None
    stash: str | None = None
    stages: int | None = None  # ddg-replicas: K
    replicas: int = 1  # ddg-replicas: R
    compile: bool = False  # through torch.compile (a name ending in -compile)
    compensation: str | None = None  # DDG rows named ROW+COMP: the names, as --compensation

    @property
    def uses_runtime_cut(self) -> bool:
        """Whether it runs the process runtime's cut (the threaded rows time their own)."""
        return self.kind in ("gpipe", "1f1b", "ddg") or \
            (self.kind == "ddg-replicas" and (self.stages or 1) > 1)

    @property
    def oversubscribed(self) -> bool:
        """More processes than this machine has cores: they share them."""
        import os

        return self.processes > (os.cpu_count() or 1)


def config_names(config: BenchConfig) -> tuple[str, ...]:
    """Every configuration ``config`` can run, in the bench's fixed order.

    Microbatch counts that do not divide the batch are left out, and so are 1F1B ones
    smaller than the number of stages (torch's Schedule1F1B refuses them).
    """
    k = config.stages
    if config.device != "cpu":
        names = [GPU_BASELINE]
        if gpu_count(config) >= k:  # the peers need a GPU per rank
            names += ["ddp", *_pipeline_names(config)]
    else:
        names = [BASELINE, f"bp-{k}t", "ddp", *_pipeline_names(config)]
    names += [f"ddg-{s}-{e}" for e in DDG_EXECUTORS for s in DDG_STASHES]
    names += replica_names(config)
    if config.compile:
        names += [f"{n}{COMPILED}" for n in names if n in
                  (BASELINE, GPU_BASELINE, f"bp-{k}t", "ddg-graph-threads",
                   "ddg-recompute-threads", "ddg-graph-processes")]
    return tuple(dict.fromkeys(names))  # bp-1t and bp-Kt coincide only for K = 1 (refused)


def replica_names(config: BenchConfig) -> list[str]:
    """With R > 1 replicas: K x 1, 1 x R (data parallelism alone) and K x R, stash graph."""
    k, r = config.stages, config.replicas
    if r <= 1:
        return []
    return [f"ddg-graph-k{k}r1", f"ddg-graph-k1r{r}", f"ddg-graph-k{k}r{r}"]


def _pipeline_names(config: BenchConfig) -> list[str]:
    names = []
    for schedule in MICROBATCHED:
        names += [f"{schedule}-m{m}" for m in config.microbatches
                  if _microbatch_problem(config, schedule, m) is None]
    return names


def _microbatch_problem(config: BenchConfig, schedule: str, m: int) -> str | None:
    if m < 1:
        return f"{schedule}-m{m} needs at least 1 microbatch"
    if config.batch_size % m:
        return (f"{schedule}-m{m}: {m} microbatches do not divide the batch of "
                f"{config.batch_size}; pick a divisor of the batch size")
    if schedule == "1f1b" and m < config.stages:
        return (f"1f1b-m{m}: torch's 1F1B schedule needs at least as many microbatches as "
                f"stages ({config.stages}); use 1f1b-m{config.stages} or more")
    return None


CONFIG_NAMES: tuple[str, ...] = config_names(BenchConfig())
"""The configurations of the default settings (K = 2, microbatches 2, 4, 8)."""


def _validate(config: BenchConfig) -> None:
    def positive_int(name: str, value, minimum: int, why: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UsageError(f"{name} must be an integer >= {minimum} (got {value!r}); {why}")

    positive_int("stages", config.stages, 2,
                 "the bench compares K >= 2 workers with one; pass stages=2 or more")
    positive_int("steps", config.steps, 1, "time at least one step")
    positive_int("rounds", config.rounds, 1, "run every configuration at least once")
    positive_int("warmup", config.warmup, 0, "pass 0 for no warm-up steps")
    positive_int("batch_size", config.batch_size, 1, "pass a positive batch size")
    positive_int("replicas", config.replicas, 1, "pass 1 for no replica rows")
    if not config.timeout_s or config.timeout_s <= 0:
        raise UsageError(f"timeout_s must be > 0 seconds (got {config.timeout_s!r})")
    if isinstance(config.configs, str):
        raise UsageError(f"configs must be a tuple of names, not the string {config.configs!r}; "
                         f"write configs=({config.configs!r},)")
    if config.optimizer not in OPTIMIZERS:
        raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got "
                         f"{config.optimizer!r}); every row of the bench steps with it")
    if config.device not in ("cpu", "cuda"):
        raise UsageError(f"bench device must be cpu or cuda (got {config.device!r})")
    if config.device == "cuda" and gpu_count(config) == 0:
        raise UsageError("bench --device cuda, but no CUDA device is available here; run it "
                         "on a machine with GPUs or use --device cpu")


def resolve(config: BenchConfig) -> list[ConfigSpec]:
    """Validate ``config`` and return the configurations to run, baseline first.

    The baseline is always run (every ratio divides by it). Raises :class:`UsageError` for an
    unknown name, a microbatch count that cannot work, or a batch DDP cannot split.
    """
    _validate(config)
    base = baseline(config)
    available = config_names(config)
    if config.configs is None:
        wanted = list(available)
    else:
        wanted = [base] + [n for n in config.configs if n != base]
    return [_spec(config, name, base, available) for name in dict.fromkeys(wanted)]


def _spec(config: BenchConfig, name: object, base: str, available: tuple[str, ...]
          ) -> ConfigSpec:
    """The configuration ``name`` stands for, or a :class:`UsageError` saying why not."""
    k, share = config.stages, cores_per_stage(config.stages)
    if not isinstance(name, str):
        raise UsageError(f"config names are strings, got {name!r}")
    if COMPENSATED in name:
        return _compensated_spec(config, name, base, available)
    if name.endswith(COMPILED):
        return _compiled_spec(config, name)
    pipe, bp, ddg = _PIPE_RE.match(name), _BP_RE.match(name), _DDG_RE.match(name)
    replicated = _REPLICAS_RE.match(name)
    needs_gpus = (name == "ddp" or pipe) and config.device != "cpu" and gpu_count(config) < k
    if needs_gpus or (name in (BASELINE, GPU_BASELINE) and name != base) or \
            (bp and config.device != "cpu"):
        raise UsageError(f"bench config {name!r} is not available here "
                         f"({_why_not(config, name)}); choose from {', '.join(available)}")
    if name == base:
        return ConfigSpec(name, "bp", 1, 1)
    if bp and int(bp.group(1)) == k:
        return ConfigSpec(name, "bp", 1, k)
    if name == "ddp":
        if config.batch_size % k:
            raise UsageError(
                f"ddp splits the batch over {k} ranks but batch_size {config.batch_size} is "
                f"not divisible by {k}; use a multiple of {k} or leave ddp out of configs"
            )
        return ConfigSpec(name, "ddp", k, share)
    if pipe:
        schedule, m = pipe.group(1), int(pipe.group(2))
        problem = _microbatch_problem(config, schedule, m)
        if problem:
            raise UsageError(problem)
        if schedule == "ddg":  # microbatched DDG, on the process runtime like ddg-*-processes
            return ConfigSpec(name, "ddg", k, share, microbatches=m, stash="graph")
        return ConfigSpec(name, schedule, k, share, microbatches=m)
    if ddg and ddg.group(2) == "threads":
        return ConfigSpec(name, "ddg-threads", 1, share, stash=ddg.group(1))
    if ddg:
        return ConfigSpec(name, "ddg", k, share, stash=ddg.group(1))
    if replicated:
        return _replica_spec(config, name, replicated)
    raise UsageError(
        f"unknown bench config {name!r}; choose from {', '.join(available)} "
        f"(gpipe-m<M>/1f1b-m<M>/ddg-m<M> take any M that divides the batch; a DDG row "
        f"takes a compensation as ROW+COMP, e.g. ddg-m4+wp)"
    )


def compensation_spec(config: BenchConfig, text: str | None) -> CompensationSpec:
    """The :class:`CompensationSpec` of a ``ROW+COMP`` row: ``text``'s names with their
    default options (PipeMare's required anneal spans the run's clocks)."""
    from ddgpipe.core.compensation import CompensationSpec

    return CompensationSpec.parse(text).with_defaults(
        pipemare_anneal=max(1, config.warmup + config.steps))


def _compensated_spec(config: BenchConfig, name: str, base: str,
                      available: tuple[str, ...]) -> ConfigSpec:
    """``ROW+COMP``: DDG row ROW with compensation COMP, refused here (before any process
    starts) when the rule cannot run with the bench's optimizer, stash mode or microbatches,
    by the engine's own checks."""
    from ddgpipe.bench.workload import bench_optimizer
    from ddgpipe.core.compensation.options import check_microbatches

    row, _, text = name.partition(COMPENSATED)
    if not text:
        raise UsageError(f"bench config {name!r} names no compensation after '+'; write "
                         f"{row}+wp, for instance, or {row} for plain DDG")
    spec = _spec(config, row, base, available)
    if spec.kind not in DDG_KINDS:
        raise UsageError(
            f"bench config {name!r}: only a DDG row takes a compensation, as ROW+COMP with "
            f"COMP one or more names as --compensation takes them (ddg-m<M>+wp, "
            f"ddg-STASH-threads+wp, ddg-STASH-processes+wp, ddg-STASH-k<K>r<R>+wp, or their "
            f"{COMPILED} twins such as ddg-graph-threads{COMPILED}+wp)")
    try:
        compensation = compensation_spec(config, text.replace(COMPENSATED, ","))
        probe = bench_optimizer(config)([_probe_parameter()])
        compensation.check(spec.stash or "graph", probe)
        check_microbatches(compensation.names, spec.microbatches or 1)
    except UsageError as e:
        raise UsageError(f"bench config {name!r} (optimizer {config.optimizer}): "
                         f"{e}") from None
    return dataclasses.replace(spec, name=name, compensation=compensation.text)


def _probe_parameter() -> Any:
    import torch

    return torch.nn.Parameter(torch.zeros(1))


def _compiled_spec(config: BenchConfig, name: str) -> ConfigSpec:
    plain = name.removesuffix(COMPILED)
    specs = resolve(dataclasses.replace(config, configs=(plain,), compile=False))
    spec = specs[-1]
    if spec.name != plain or spec.kind not in COMPILABLE:
        raise UsageError(f"bench config {name!r}: only backprop (bp-Nt) and DDG rows "
                         f"(ddg-STASH-threads/processes) have a {COMPILED} twin")
    return dataclasses.replace(spec, name=name, compile=True)


def _replica_spec(config: BenchConfig, name: str, match: re.Match) -> ConfigSpec:
    stash, stages, replicas = match.group(1), int(match.group(2)), int(match.group(3))
    if stages not in (1, config.stages) or replicas < 1:
        raise UsageError(f"bench config {name!r}: a K x R row runs K = 1 or the bench's K = "
                         f"{config.stages} stages (the cut is timed for those); use "
                         f"ddg-{stash}-k{config.stages}r{replicas} or ddg-{stash}-k1r{replicas}")
    if config.batch_size % replicas:
        raise UsageError(f"{name} splits the batch over {replicas} replicas but batch_size "
                         f"{config.batch_size} is not divisible by {replicas}; use a multiple "
                         f"of {replicas}")
    processes = stages * replicas
    return ConfigSpec(name, "ddg-replicas", processes, cores_per_stage(processes),
                      stash=stash, stages=stages, replicas=replicas)


def _why_not(config: BenchConfig, name: str) -> str:
    if config.device != "cpu":
        if name.startswith("bp-"):
            return f"on GPUs the baseline is {GPU_BASELINE}"
        return f"needs {config.stages} GPUs, this machine has {gpu_count(config)}"
    return f"on the CPU the baseline is {BASELINE}"
