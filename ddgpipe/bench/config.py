"""What the bench runs: the settings, the configuration names, and their validation.

Every configuration trains the same model on the same global batch for the same number of
steps; they differ only in how the work is spread over processes and threads:

* ``bp-1t``       plain backprop, one process, one thread: the baseline every ratio uses;
* ``bp-{K}t``     plain backprop, one process, K threads (intra-op parallelism);
* ``ddp``         DistributedDataParallel, K ranks, each 1/K of the batch (data parallelism);
* ``gpipe-m{M}``  torch.distributed.pipelining's GPipe schedule, K stages, M microbatches;
* ``1f1b-m{M}``   the same with the 1F1B schedule (needs M >= K);
* ``ddg-{stash}`` DDG (``ddgpipe.methods.DDG``) with K stages and the given stash mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ddgpipe.errors import UsageError
from ddgpipe.launch import threads_per_worker

__all__ = ["BenchConfig", "ConfigSpec", "CONFIG_NAMES", "BASELINE", "config_names", "resolve"]

BASELINE = "bp-1t"
DDG_STASHES = ("graph", "recompute", "none")
_PIPE_RE = re.compile(r"^(gpipe|1f1b)-m(\d+)$")
_BP_RE = re.compile(r"^bp-(\d+)t$")


@dataclass
class BenchConfig:
    """Settings shared by every configuration of one bench.

    ``stages`` is K, the number of workers (processes for ddp/pipelines/DDG, threads for
    ``bp-{K}t``); ``steps`` are timed after ``warmup`` untimed ones, in every one of
    ``rounds`` rounds; ``microbatches`` lists the M of ``gpipe-m{M}``/``1f1b-m{M}``;
    ``configs`` picks a subset of names (``bp-1t`` is always added: it is the baseline);
    ``timeout_s`` bounds each configuration run.
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


@dataclass(frozen=True)
class ConfigSpec:
    """One configuration, resolved: what the workers build and how many of them."""

    name: str
    kind: str  # "bp", "ddp", "gpipe", "1f1b" or "ddg"
    processes: int
    threads: int  # torch threads per process
    microbatches: int | None = None
    stash: str | None = None


def config_names(config: BenchConfig) -> tuple[str, ...]:
    """Every configuration ``config`` can run, in the bench's fixed order.

    Microbatch counts that do not divide the batch are left out, and so are 1F1B ones
    smaller than the number of stages (torch's Schedule1F1B refuses them).
    """
    k = config.stages
    names = [BASELINE, f"bp-{k}t", "ddp"]
    for m in config.microbatches:
        if _microbatch_problem(config, "gpipe", m) is None:
            names.append(f"gpipe-m{m}")
    for m in config.microbatches:
        if _microbatch_problem(config, "1f1b", m) is None:
            names.append(f"1f1b-m{m}")
    names += [f"ddg-{s}" for s in DDG_STASHES]
    return tuple(dict.fromkeys(names))  # bp-1t and bp-Kt coincide only for K = 1 (refused)


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
    if not config.timeout_s or config.timeout_s <= 0:
        raise UsageError(f"timeout_s must be > 0 seconds (got {config.timeout_s!r})")
    if isinstance(config.configs, str):
        raise UsageError(f"configs must be a tuple of names, not the string {config.configs!r}; "
                         f"write configs=({config.configs!r},)")


def resolve(config: BenchConfig) -> list[ConfigSpec]:
    """Validate ``config`` and return the configurations to run, baseline first.

    ``bp-1t`` is always run (every ratio divides by it). Raises :class:`UsageError` for an
    unknown name, a microbatch count that cannot work, or a batch DDP cannot split.
    """
    _validate(config)
    k = config.stages
    available = config_names(config)
    if config.configs is None:
        wanted = list(available)
    else:
        wanted = [BASELINE] + [n for n in config.configs if n != BASELINE]
    specs = []
    share = threads_per_worker(k)
    for name in dict.fromkeys(wanted):
        if not isinstance(name, str):
            raise UsageError(f"config names are strings, got {name!r}")
        pipe = _PIPE_RE.match(name)
        bp = _BP_RE.match(name)
        if bp and int(bp.group(1)) in (1, k):
            specs.append(ConfigSpec(name, "bp", 1, int(bp.group(1))))
        elif name == "ddp":
            if config.batch_size % k:
                raise UsageError(
                    f"ddp splits the batch over {k} ranks but batch_size {config.batch_size} is "
                    f"not divisible by {k}; use a multiple of {k} or leave ddp out of configs"
                )
            specs.append(ConfigSpec(name, "ddp", k, share))
        elif pipe:
            schedule, m = pipe.group(1), int(pipe.group(2))
            problem = _microbatch_problem(config, schedule, m)
            if problem:
                raise UsageError(problem)
            specs.append(ConfigSpec(name, schedule, k, share, microbatches=m))
        elif name.startswith("ddg-") and name[4:] in DDG_STASHES:
            specs.append(ConfigSpec(name, "ddg", k, share, stash=name[4:]))
        else:
            raise UsageError(
                f"unknown bench config {name!r}; choose from {', '.join(available)} "
                f"(gpipe-m<M>/1f1b-m<M> take any M that divides the batch)"
            )
    return specs
