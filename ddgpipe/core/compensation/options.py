"""The one table of compensation names and options: the API checks against it and the command
line's flags are generated from it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ddgpipe.errors import UsageError

__all__ = ["COMPENSATIONS", "Option", "OPTION_TABLE", "OPTIONS", "parse_compensation",
           "check_options", "MICROBATCH_REFUSALS", "check_microbatches"]

#: every name, with the one line ``ddgpipe train --help`` shows
COMPENSATIONS: dict[str, str] = {
    "sc": "spike compensation (Kosson et al. 2021): momentum SGD applies a gradient late by D "
          "steps as w -= lr (m^D v + (1-m^D)/(1-m) g); momentum SGD only",
    "lwp": "linear weight prediction (Kosson et al. 2021): the forward (and the stash) uses "
           "w - lr D v, where the weights will be when its gradient lands; momentum SGD only",
    "dc": "DC-ASGD-a (Zheng et al. 2017): g + lambda_t g*g*(w - w_forward), lambda_t = "
          "lambda0/sqrt(mean square of g); any optimizer; stash graph or recompute",
    "dc-c": "DC-ASGD-c: the same with a constant lambda",
    "pipemare-lr": "PipeMare T1 (Yang et al. 2021): each stage's lr starts at lr/delay and "
                   "ramps to lr over --pipemare-anneal clocks; any optimizer",
    "pipemare": "PipeMare T1 + T2: also replays each delayed forward at w - delay * "
                "(moving average of updates), estimating the forward's weights; stash none only",
    "stage-momentum": "stage-dependent momentum (Ajanthan et al. 2025, AsyncPP): beta1 of "
                      "stage k = b0 + d_k (--stage-momentum-max - b0) / K; Adam, AdamW, NAdam, "
                      "Muon, or momentum SGD (as Nesterov, lr scaled to keep the step)",
    "delay-lr": "delay-adaptive lr (Mishchenko et al. 2022): stage k's lr times "
                "min(1, --delay-lr-c / d_k); any optimizer",
    "accumulate": "bounded staleness (PipeDream-2BW, PACI): a delayed stage steps once every "
                  "--accumulate-steps gradients with their mean; any optimizer",
    "wp": "optimizer-dependent weight prediction (XPipe, PipeOptim; Guan et al. 2019, 2023): "
          "the forward (and the stash) uses w - lr D u, u the optimizer's update direction "
          "(Adam/AdamW: m_hat / (sqrt(v_hat) + eps) + decoupled decay); momentum SGD, Adam, "
          "AdamW, NAdam",
}


@dataclass(frozen=True)
class Option:
    """One hyperparameter of the rules in ``users``; ``--name-with-dashes`` on the command
    line. ``default`` None: the rule's own default, or required."""

    name: str
    default: float | int | None
    kind: type
    metavar: str
    users: tuple[str, ...]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTION_TABLE: tuple[Option, ...] = (
    Option("dc_lambda", None, float, "LAMBDA", ("dc", "dc-c"),
           "dc: lambda_0 of the adaptive lambda (default 2); dc-c: the constant lambda "
           "(default 0.04)"),
    Option("dc_decay", 0.95, float, "BETA", ("dc",),
           "dc: decay of the gradient's mean square (default 0.95)"),
    Option("pipemare_anneal", None, int, "CLOCKS", ("pipemare", "pipemare-lr"),  # required
           "pipemare, pipemare-lr: clocks (minibatches) over which each stage's lr ramps from "
           "lr/delay to lr (default: one epoch; PipeMare tunes it)"),
    Option("pipemare_ema", 0.9, float, "GAMMA", ("pipemare",),  # ddgpipe's default
           "pipemare: decay of the moving average of weight updates that estimates the "
           "forward's weights (default 0.9)"),
    Option("stage_momentum_max", 0.99, float, "BMAX", ("stage-momentum",),  # AsyncPP's
           "stage-momentum: bmax of beta1_k = b0 + d_k (bmax - b0) / K (default 0.99, "
           "AsyncPP's)"),
    Option("delay_lr_c", 1.0, float, "C", ("delay-lr",),  # ddgpipe's default (lr / d_k)
           "delay-lr: c of the lr factor min(1, c / d_k) (default 1: lr / d_k; c >= K-1 "
           "changes nothing)"),
    Option("accumulate_steps", 4, int, "A", ("accumulate",),  # ddgpipe's (PACI's is 8)
           "accumulate: a delayed stage steps once every A gradients with their mean "
           "(default 4)"),
)

#: option name -> default (None: the rule's own default, or required)
OPTIONS: dict[str, float | int | None] = {o.name: o.default for o in OPTION_TABLE}
_USERS = {o.name: o.users for o in OPTION_TABLE}


def parse_compensation(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"sc,lwp"`` or ``["sc", "lwp"]`` -> ``("sc", "lwp")``; None or ``"none"`` -> ``()``."""
    if spec is None:
        return ()
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = tuple(p.strip() for p in parts if p and p.strip() and p.strip() != "none")
    for name in names:
        if name not in COMPENSATIONS:
            raise UsageError(f"unknown compensation {name!r}; choose from "
                             f"{', '.join(COMPENSATIONS)} (comma-separated)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"compensation {', '.join(repeated)} given twice; name each once")
    return names


def check_options(names: tuple[str, ...], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every option (the given ones over the defaults), refusing unknown or unused names, bad
    values and rules that cannot go together; a required option may still be missing."""
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise UsageError(f"unknown compensation option {', '.join(unknown)}; the options are "
                         f"{', '.join(OPTIONS)}")
    for key in given:
        if given[key] is not None and not set(_USERS[key]) & set(names):
            raise UsageError(f"option {key} only applies to compensation "
                             f"{' or '.join(_USERS[key])}, which is not selected; drop it or "
                             f"add the compensation")
    opts: dict[str, Any] = dict(OPTIONS) | {k: v for k, v in given.items() if v is not None}
    _check_values(opts)
    if {"wp", "accumulate"} <= set(names):
        raise UsageError("compensation wp predicts d_k optimizer steps ahead, but accumulate "
                         "steps a delayed stage once every --accumulate-steps gradients, so "
                         "the prediction would overshoot; choose one of them")
    if {"stage-momentum", "sc"} <= set(names):
        raise UsageError("compensations stage-momentum and sc both set how momentum applies a "
                         "late gradient (sc replaces momentum SGD's update for the delay); "
                         "choose one of them")
    return opts


#: the rules that do not compose with microbatched DDG (M > 1), each with why; every other
#: rule composes, its delay counted in optimizer steps (ceil(d_k / M), ``Rule.stale_steps``)
MICROBATCH_REFUSALS: dict[str, str] = {
    "dc": "dc corrects a gradient with the weights its own forward used, but a microbatched "
          "step sums gradients whose forwards ran at two weight versions",
    "dc-c": "dc-c corrects a gradient with the weights its own forward used, but a "
            "microbatched step sums gradients whose forwards ran at two weight versions",
    "accumulate": "accumulate duplicates microbatching (both step once per several "
                  "gradients with their mean; microbatches do it on every stage alike)",
}


def check_microbatches(names: tuple[str, ...], microbatches: int) -> None:
    """Refuse a rule that does not compose with ``microbatches`` > 1, saying why."""
    refused = [n for n in names if n in MICROBATCH_REFUSALS]
    if microbatches > 1 and refused:
        raise UsageError(f"compensation {refused[0]} does not compose with microbatches "
                         f"({microbatches}): {MICROBATCH_REFUSALS[refused[0]]}; drop one of "
                         "them")


def _check_values(opts: Mapping[str, Any]) -> None:
    lam = opts["dc_lambda"]
    if lam is not None and not (lam > 0 and math.isfinite(lam)):
        raise UsageError(f"dc_lambda must be a positive number (got {lam})")
    if not 0 <= opts["dc_decay"] < 1:
        raise UsageError(f"dc_decay must be in [0, 1) (got {opts['dc_decay']})")
    if not 0 <= opts["pipemare_ema"] < 1:
        raise UsageError(f"pipemare_ema must be in [0, 1) (got {opts['pipemare_ema']})")
    anneal = opts["pipemare_anneal"]
    if anneal is not None and (int(anneal) != anneal or anneal < 1):
        raise UsageError(f"pipemare_anneal must be a whole number of clocks >= 1 "
                         f"(got {anneal})")
    top = opts["stage_momentum_max"]
    if not 0 < top < 1:
        raise UsageError(f"stage_momentum_max must be in (0, 1) (got {top}); AsyncPP uses 0.99")
    c = opts["delay_lr_c"]
    if not (c > 0 and math.isfinite(c)):
        raise UsageError(f"delay_lr_c must be a positive number (got {c}); with c >= K-1 "
                         "delay-lr changes nothing")
    steps = opts["accumulate_steps"]
    if isinstance(steps, bool) or int(steps) != steps or steps < 2:
        raise UsageError(f"accumulate_steps must be a whole number >= 2 (got {steps}); "
                         "1 is plain DDG: drop accumulate")


def require_options(names: tuple[str, ...], opts: Mapping[str, Any]) -> None:
    """Refuse a selected rule whose required option has no value."""
    if {"pipemare", "pipemare-lr"} & set(names) and opts["pipemare_anneal"] is None:
        raise UsageError(
            "pipemare needs pipemare_anneal=K: the clocks over which each stage's lr "
            "ramps from lr/delay to lr (PipeMare tunes K per task; e.g. one epoch of "
            "minibatches); on the command line --pipemare-anneal defaults to one epoch"
        )
