"""Staleness compensation from the asynchronous-pipeline literature, by name.

    pipe = ddgpipe.DDG(model, 4, optimizer, compensation="sc,lwp")

``sc``, ``lwp`` (Kosson et al. 2021); ``dc``, ``dc-c`` (DC-ASGD, Zheng et al. 2017);
``pipemare-lr``, ``pipemare`` (Yang et al. 2021); ``stage-momentum`` (AsyncPP, Ajanthan et al.
2025); ``delay-lr`` (Mishchenko et al. 2022); ``accumulate`` (PipeDream-2BW, PACI); ``wp``
(XPipe, PipeOptim: Guan et al. 2019, 2023). Commas
combine rules that change different phases of a step; only delayed stages use them.

Each rule, its optimizers, stash modes and sources: ``docs/compensation.md``, "Overview".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ddgpipe.core.compensation.accumulate import Accumulate
from ddgpipe.core.compensation.base import PHASES, Compensation, Rule, Rules
from ddgpipe.core.compensation.delay import DelayCompensation
from ddgpipe.core.compensation.delay_lr import DelayAdaptiveLR
from ddgpipe.core.compensation.optimizer_prediction import OptimizerWeightPrediction
from ddgpipe.core.compensation.pipemare import PipeMareLR, PipeMareReplay
from ddgpipe.core.compensation.prediction import LinearWeightPrediction
from ddgpipe.core.compensation.spike import SpikeCompensation
from ddgpipe.core.compensation.stage_momentum import StageMomentum
from ddgpipe.errors import UsageError

__all__ = ["Compensation", "Rule", "Rules", "PHASES", "COMPENSATIONS", "OPTIONS",
           "parse_compensation", "make_compensation"]

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

#: option name -> default (None: the rule's own default, or required)
OPTIONS: dict[str, float | int | None] = {
    "dc_lambda": None,  # dc: 2.0 (lambda_0 of DC-ASGD-a), dc-c: 0.04
    "dc_decay": 0.95,
    "pipemare_anneal": None,  # K, in clocks: required
    "pipemare_ema": 0.9,  # gamma of T2's moving average: ddgpipe's default
    "stage_momentum_max": 0.99,  # bmax, hard-coded in AsyncPP
    "delay_lr_c": 1.0,  # c of min(1, c / d_k): ddgpipe's default (lr / d_k)
    "accumulate_steps": 4,  # A: ddgpipe's default (PACI's is 8)
}


DC_LAMBDA = {"dc": 2.0, "dc-c": 0.04}


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


def _options(names: tuple[str, ...], given: Mapping[str, float] | None) -> dict:
    given = dict(given or {})
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise UsageError(f"unknown compensation option {', '.join(unknown)}; the options are "
                         f"{', '.join(OPTIONS)}")
    users = {"dc_lambda": ("dc", "dc-c"), "dc_decay": ("dc",),
             "pipemare_anneal": ("pipemare", "pipemare-lr"), "pipemare_ema": ("pipemare",),
             "stage_momentum_max": ("stage-momentum",), "delay_lr_c": ("delay-lr",),
             "accumulate_steps": ("accumulate",)}
    for key in given:
        if given[key] is not None and not set(users[key]) & set(names):
            raise UsageError(f"option {key} only applies to compensation "
                             f"{' or '.join(users[key])}, which is not selected; drop it or "
                             f"add the compensation")
    opts: dict[str, Any] = dict(OPTIONS) | {k: v for k, v in given.items() if v is not None}
    lam = opts["dc_lambda"]
    if lam is not None and not (lam > 0 and math.isfinite(lam)):
        raise UsageError(f"dc_lambda must be a positive number (got {lam})")
    if not 0 <= opts["dc_decay"] < 1:
        raise UsageError(f"dc_decay must be in [0, 1) (got {opts['dc_decay']})")
    if not 0 <= opts["pipemare_ema"] < 1:
        raise UsageError(f"pipemare_ema must be in [0, 1) (got {opts['pipemare_ema']})")
    anneal = opts["pipemare_anneal"]
    if {"pipemare", "pipemare-lr"} & set(names):
        if anneal is None:
            raise UsageError(
                "pipemare needs pipemare_anneal=K: the clocks over which each stage's lr "
                "ramps from lr/delay to lr (PipeMare tunes K per task; e.g. one epoch of "
                "minibatches); on the command line --pipemare-anneal defaults to one epoch"
            )
        if int(anneal) != anneal or anneal < 1:
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
    if {"stage-momentum", "sc"} <= set(names):
        raise UsageError("compensations stage-momentum and sc both set how momentum applies a "
                         "late gradient (sc replaces momentum SGD's update for the delay); "
                         "choose one of them")
    if {"wp", "accumulate"} <= set(names):
        raise UsageError("compensation wp predicts d_k optimizer steps ahead, but accumulate "
                         "steps a delayed stage once every --accumulate-steps gradients, so "
                         "the prediction would overshoot; choose one of them")
    return opts


def _rules(names: tuple[str, ...], opts: dict) -> list[Rule]:
    rules: list[Rule] = []
    for name in names:
        if name == "sc":
            rules.append(SpikeCompensation())
        elif name == "lwp":
            rules.append(LinearWeightPrediction())
        elif name in ("dc", "dc-c"):
            lam = opts["dc_lambda"] if opts["dc_lambda"] is not None else DC_LAMBDA[name]
            rules.append(DelayCompensation(name == "dc", lam, opts["dc_decay"]))
        elif name == "pipemare-lr":
            rules.append(PipeMareLR(int(opts["pipemare_anneal"])))
        elif name == "pipemare":
            rules += [PipeMareLR(int(opts["pipemare_anneal"])),
                      PipeMareReplay(opts["pipemare_ema"])]
        elif name == "stage-momentum":
            rules.append(StageMomentum(float(opts["stage_momentum_max"])))
        elif name == "delay-lr":
            rules.append(DelayAdaptiveLR(float(opts["delay_lr_c"])))
        elif name == "accumulate":
            rules.append(Accumulate(int(opts["accumulate_steps"])))
        elif name == "wp":
            rules.append(OptimizerWeightPrediction())
    return rules


def _check_stash(names: tuple[str, ...], stash: str) -> None:
    for name in names:
        if name in ("dc", "dc-c") and stash == "none":
            raise UsageError(
                f"compensation {name} corrects a gradient computed at the forward's (older) "
                "weights, but stash none replays the backward at the live weights, so there "
                "is no delay to compensate (w - w_forward = 0); use --stash graph or recompute "
                f"with {name}"
            )
        if name == "pipemare" and stash != "none":
            raise UsageError(
                f"compensation pipemare includes T2, which corrects the weights a stash-none "
                f"replay uses; with stash {stash} the backward already runs at the forward's "
                "exact weights, so there is nothing to correct: use pipemare-lr (T1 alone) "
                f"with stash {stash}, or --stash none (--method fr) for T1 + T2"
            )


def make_compensation(spec: str | Sequence[str] | None, stash: str = "graph",
                      options: Mapping[str, float] | None = None,
                      optimizer: torch.optim.Optimizer | None = None,
                      ) -> Callable[[], Compensation]:
    """A factory of fresh compensations (one per stage: each keeps its own state).

    Unknown names, names undefined for ``stash``, and bad or unused options fail here, with
    a :class:`UsageError`; a rule undefined for the optimizer fails here when ``optimizer``
    (an instance like the stages' ones) is given, else when a stage binds it.
    """
    names = parse_compensation(spec)
    opts = _options(names, options)
    _check_stash(names, stash)
    if not names:
        return Compensation
    rules = Rules(_rules(names, opts))  # two rules in one phase fail now, not in every stage
    if optimizer is not None:
        for rule in rules.rules:
            rule.check(optimizer)

    def build() -> Compensation:
        return Rules(_rules(names, opts))

    return build
