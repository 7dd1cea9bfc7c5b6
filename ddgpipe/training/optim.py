"""Optimizers and learning-rate schedules built from CLI settings.

Schedules are functions of the *iteration* (one clock of the pipeline = one minibatch), so
the same ``LambdaLR`` drives backprop, where it steps once per minibatch, and every DDG stage,
where it steps once per clock: all stages then share lr_t, as the paper's update requires.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ddgpipe.errors import UsageError

__all__ = ["OPTIMIZERS", "LR_SCHEDULES", "make_optimizer", "make_lr_scheduler", "lr_factor",
           "schedule_factor", "decay_groups", "MuonAdamW"]

OPTIMIZERS = ("sgd", "adam", "adamw", "nadam", "muon")
LR_SCHEDULES = ("constant", "multistep", "sqrt", "inverse", "cosine")


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """nanoGPT's grouping: weight decay on every matrix (2-D and up: linear weights and
    embeddings), none on vectors (biases, LayerNorm and BatchNorm scales)."""
    return [g for g in ({"params": [p for p in params if p.dim() >= 2],
                         "weight_decay": weight_decay},
                        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0})
            if g["params"]]


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` for the matrix weights inside the network, AdamW (nanoGPT's decay
    groups) for the rest: embeddings, the output projection (``adamw_only``), biases, norms.
    Muon's step is scaled to AdamW's RMS (``adjust_lr_fn="match_rms_adamw"``), so one lr and
    one weight decay serve both; its momentum is its own (0.95, Nesterov)."""

    def __init__(self, params: list[nn.Parameter], lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, adamw_only: frozenset[int] = frozenset()):
        matrices = [p for p in params if p.dim() == 2 and id(p) not in adamw_only]
        rest = [p for p in params if p.dim() != 2 or id(p) in adamw_only]
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay,
                                     adjust_lr_fn="match_rms_adamw") if matrices else None
        self.adamw = torch.optim.AdamW(decay_groups(rest, weight_decay), lr=lr, betas=betas,
                                       eps=eps) if rest else None
        inner = [o for o in (self.muon, self.adamw) if o is not None]
        super().__init__([p for o in inner for g in o.param_groups for p in g["params"]],
                         {"lr": lr})
        self.param_groups = [g for o in inner for g in o.param_groups]  # the inner ones
        self._inner = inner

    @torch.no_grad()
    def step(self, closure=None):
        for optimizer in self._inner:
            optimizer.step()

    def state_dict(self) -> dict:
        return {"inner": [o.state_dict() for o in self._inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        for optimizer, state in zip(self._inner, state_dict["inner"], strict=True):
            optimizer.load_state_dict(state)


def make_optimizer(
    name: str,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    betas: tuple[float, float] | None = None,
    eps: float = 1e-8,
    adamw_only: frozenset[int] = frozenset(),
    momentum_decay: float = 0.004,
) -> Callable[[list], torch.optim.Optimizer]:
    """A ``params -> optimizer`` factory: DDG builds one optimizer per stage with it.

    ``sgd`` (L2 weight decay, momentum, Nesterov) and ``adam`` (L2 weight decay) decay every
    parameter; ``adamw``, ``nadam`` (NAdam with decoupled weight decay, torch's momentum
    schedule) and ``muon`` (:class:`MuonAdamW`) decay matrices only (:func:`decay_groups`).
    ``betas`` default to torch's (0.9, 0.999); ``adamw_only`` are ids of matrices Muon leaves
    to AdamW (embeddings, the output projection). ``momentum_decay`` is NAdam's psi (torch's
    default 0.004), the pace of its momentum schedule.
    """
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not lr > 0 or not math.isfinite(lr):
        raise UsageError(f"learning rate must be a positive number (got --lr {lr})")
    if not 0 <= momentum < 1:
        raise UsageError(f"momentum must be in [0, 1) (got --momentum {momentum})")
    if weight_decay < 0:
        raise UsageError(f"weight decay must be >= 0 (got --weight-decay {weight_decay})")
    if nesterov and (name != "sgd" or momentum == 0):
        raise UsageError("--nesterov needs --optimizer sgd with --momentum > 0")
    if betas is not None and not all(0 <= b < 1 for b in betas):
        raise UsageError(f"--beta1 and --beta2 must be in [0, 1) (got {betas[0]}, {betas[1]})")
    if betas is not None and name in ("sgd", "adam"):
        raise UsageError(f"--beta1/--beta2 are for adamw, nadam and muon; {name} uses "
                         + ("--momentum" if name == "sgd" else "torch's (0.9, 0.999)"))
    b = betas or (0.9, 0.999)
    if name == "sgd":
        return lambda ps: torch.optim.SGD(
            ps, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    if name == "adam":
        return lambda ps: torch.optim.Adam(ps, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return lambda ps: torch.optim.AdamW(decay_groups(ps, weight_decay), lr=lr, betas=b,
                                            eps=eps)
    if name == "nadam":
        return lambda ps: torch.optim.NAdam(decay_groups(ps, weight_decay), lr=lr, betas=b,
                                            eps=eps, decoupled_weight_decay=True,
                                            momentum_decay=momentum_decay)
    return lambda ps: MuonAdamW(list(ps), lr, b, eps, weight_decay, adamw_only)


def lr_factor(
    schedule: str,
    iteration: int,
    steps_per_epoch: int,
    total_iterations: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    floor: float = 0.0,
) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based).

    * ``constant``: 1 — the paper's constant step size.
    * ``multistep``: ``gamma ** (#milestones passed)``; milestones are epochs (the paper's
      CIFAR recipe: x0.1 at epochs 150 and 225).
    * ``sqrt``: ``1 / sqrt(1 + t)`` and ``inverse``: ``1 / (1 + t)``, the diminishing step
      sizes of the convergence analysis, with t = iteration / steps_per_epoch (epochs so far).
    * ``cosine``: half a cosine from 1 to ``floor`` over the run (AsyncPP's and nanoGPT's
      ``min_lr``: ``floor + (1 - floor) (1 + cos(pi t / T)) / 2``).
    """
    t = iteration / steps_per_epoch
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        return gamma ** sum(iteration >= m * steps_per_epoch for m in milestones)
    if schedule == "sqrt":
        return 1.0 / math.sqrt(1.0 + t)
    if schedule == "inverse":
        return 1.0 / (1.0 + t)
    if schedule == "cosine":
        half = 0.5 * (1.0 + math.cos(math.pi * min(iteration, total_iterations) / total_iterations))
        return floor + (1.0 - floor) * half  # floor 0: exactly the half cosine
    raise UsageError(f"unknown LR schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")


def make_lr_scheduler(
    schedule: str,
    steps_per_epoch: int,
    epochs: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    *,
    warmup_epochs: int = 0,
    warmup_factor: float = 0.1,
    warmup_iters: int = 0,
    total_iterations: int | None = None,
    lr_floor: float = 0.0,
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """An ``optimizer -> LambdaLR`` factory stepped once per iteration/clock.

    ``warmup_epochs`` multiply the lr by ``warmup_factor`` for the first epochs: He et al.
    train ResNet-110 at 0.01 before switching to 0.1, and so does the DDG paper.
    ``warmup_iters`` ramps it linearly instead (see :func:`schedule_factor`).
    """
    factor = schedule_factor(schedule, steps_per_epoch, epochs, milestones, gamma,
                             warmup_epochs=warmup_epochs, warmup_factor=warmup_factor,
                             warmup_iters=warmup_iters, total_iterations=total_iterations,
                             lr_floor=lr_floor)
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)


def schedule_factor(
    schedule: str,
    steps_per_epoch: int,
    epochs: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    *,
    warmup_epochs: int = 0,
    warmup_factor: float = 0.1,
    warmup_iters: int = 0,
    total_iterations: int | None = None,
    lr_floor: float = 0.0,
) -> Callable[[int], float]:
    """The multiplier of the base lr at each iteration: what :func:`make_lr_scheduler` runs,
    so ``base_lr * schedule_factor(...)(t)`` is exactly the lr every stage uses at clock t.

    ``total_iterations`` (default: every batch of every epoch) is where cosine reaches 0.
    ``warmup_iters`` > 0 is nanoGPT's warm-up: the factor rises linearly, ``(t + 1) / W``,
    over the first W iterations, and the schedule then runs over the remaining ones.
    ``lr_floor``: cosine ends at that fraction of the base lr instead of 0."""
    if schedule not in LR_SCHEDULES:
        raise UsageError(
            f"unknown LR schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
        )
    bad = [m for m in milestones if m < 1]
    if bad:  # milestones past the last epoch are allowed: a shortened run of a recipe
        raise UsageError(f"LR milestones must be epochs >= 1 (got {bad})")
    if not 0 < gamma <= 1:
        raise UsageError(f"--lr-gamma must be in (0, 1] (got {gamma})")
    if not 0 <= lr_floor < 1 or (lr_floor and schedule != "cosine"):
        raise UsageError(f"--lr-floor is the fraction of the lr cosine ends at, in [0, 1) and "
                         f"for --lr-schedule cosine only (got {lr_floor} with {schedule})")
    total = total_iterations or steps_per_epoch * epochs
    milestones = tuple(milestones)
    if not 0 <= warmup_iters < total:
        raise UsageError(f"--warmup-iters {warmup_iters} must be below the run's {total} "
                         "iterations")
    warmup_iterations = warmup_epochs * steps_per_epoch

    def factor(i: int) -> float:
        if warmup_iters:
            if i < warmup_iters:
                return (i + 1) / warmup_iters
            i -= warmup_iters
            return lr_factor(schedule, i, steps_per_epoch, total - warmup_iters, milestones,
                             gamma, lr_floor)
        scale = warmup_factor if i < warmup_iterations else 1.0
        return scale * lr_factor(schedule, i, steps_per_epoch, total, milestones, gamma,
                                 lr_floor)

    return factor
