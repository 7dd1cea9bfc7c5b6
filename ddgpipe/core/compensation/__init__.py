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

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ddgpipe.core.compensation.accumulate import Accumulate
from ddgpipe.core.compensation.base import PHASES, Compensation, Rule, Rules
from ddgpipe.core.compensation.delay import DelayCompensation
from ddgpipe.core.compensation.delay_lr import DelayAdaptiveLR
from ddgpipe.core.compensation.optimizer_prediction import OptimizerWeightPrediction
from ddgpipe.core.compensation.options import (
    COMPENSATIONS,
    OPTION_TABLE,
    OPTIONS,
    check_options,
    parse_compensation,
    require_options,
)
from ddgpipe.core.compensation.pipemare import PipeMareLR, PipeMareReplay
from ddgpipe.core.compensation.prediction import LinearWeightPrediction
from ddgpipe.core.compensation.spike import SpikeCompensation
from ddgpipe.core.compensation.stage_momentum import StageMomentum
from ddgpipe.errors import UsageError

__all__ = ["Compensation", "Rule", "Rules", "PHASES", "COMPENSATIONS", "OPTIONS", "OPTION_TABLE",
           "CompensationSpec", "parse_compensation", "make_compensation"]


DC_LAMBDA = {"dc": 2.0, "dc-c": 0.04}


@dataclass(frozen=True)
class CompensationSpec:
    """Which rules a run uses and the options given for them, checked once when parsed.

    ``options`` holds only the options given (the rules' defaults fill the rest when built);
    ``text`` and ``options`` are what ``config.json`` records.
    """

    names: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: CompensationSpec | str | Sequence[str] | None = None,
              options: Mapping[str, Any] | None = None) -> CompensationSpec:
        """``("sc,lwp", {"dc_lambda": 1.0})`` -> a spec; unknown names, unused options and
        bad values fail here with a :class:`UsageError`."""
        if isinstance(spec, CompensationSpec):
            if not options:
                return spec
            return cls.parse(spec.names, {**spec.options, **options})
        names = parse_compensation(spec)
        given = {k: v for k, v in (options or {}).items() if v is not None}
        check_options(names, given)
        return cls(names, given)

    def __bool__(self) -> bool:
        return bool(self.names or self.options)

    @property
    def text(self) -> str | None:
        """The names as ``--compensation`` takes them; None for plain DDG."""
        return ",".join(self.names) or None

    def with_defaults(self, **values: Any) -> CompensationSpec:
        """The spec with ``values`` for the options its rules use and that were not given
        (the command line's one-epoch PipeMare anneal)."""
        users = {o.name: o.users for o in OPTION_TABLE}
        added = {k: v for k, v in values.items()
                 if k not in self.options and set(users[k]) & set(self.names)}
        return dataclasses.replace(self, options=self.options | added) if added else self

    def check(self, stash: str = "graph", optimizer: torch.optim.Optimizer | None = None
              ) -> None:
        """Refuse rules undefined for ``stash`` or ``optimizer`` (an instance like the
        stages' ones), a missing required option and two rules in one phase: before any
        stage is built."""
        self.factory(stash, optimizer)

    def factory(self, stash: str = "graph", optimizer: torch.optim.Optimizer | None = None
                ) -> Callable[[], Compensation]:
        """A factory of fresh compensations (one per stage: each keeps its own state)."""
        opts = dict(OPTIONS) | self.options
        require_options(self.names, opts)
        _check_stash(self.names, stash)
        if not self.names:
            return Compensation
        rules = Rules(_rules(self.names, opts))  # two rules in one phase fail now
        if optimizer is not None:
            for rule in rules.rules:
                rule.check(optimizer)
        names = self.names

        def build() -> Compensation:
            return Rules(_rules(names, opts))

        return build


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


def make_compensation(spec: CompensationSpec | str | Sequence[str] | None, stash: str = "graph",
                      options: Mapping[str, float] | None = None,
                      optimizer: torch.optim.Optimizer | None = None,
                      ) -> Callable[[], Compensation]:
    """A factory of fresh compensations (one per stage: each keeps its own state).

    Unknown names, names undefined for ``stash``, and bad or unused options fail here, with
    a :class:`UsageError`; a rule undefined for the optimizer fails here when ``optimizer``
    (an instance like the stages' ones) is given, else when a stage binds it.
    """
    return CompensationSpec.parse(spec, options).factory(stash, optimizer)
