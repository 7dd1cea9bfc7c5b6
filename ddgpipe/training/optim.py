"""Optimizers and learning-rate schedules built from CLI settings.

Schedules are functions of the *iteration* (one clock of the pipeline = one minibatch), so
the same ``LambdaLR`` drives backprop, where it steps once per minibatch, and every DDG stage,
where it steps once per clock: all stages then share lr_t, as the paper's update requires.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ddgpipe.errors import UsageError

__all__ = ["OPTIMIZERS", "LR_SCHEDULES", "make_optimizer", "make_lr_scheduler", "lr_factor",
           "schedule_factor"]

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "multistep", "sqrt", "inverse", "cosine")


def make_optimizer(
    name: str,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> Callable[[list], torch.optim.Optimizer]:
    """A ``params -> optimizer`` factory: DDG builds one optimizer per stage with it."""
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
    if name == "sgd":
        return lambda ps: torch.optim.SGD(
            ps, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    return lambda ps: torch.optim.Adam(ps, lr=lr, weight_decay=weight_decay)


def lr_factor(
    schedule: str,
    iteration: int,
    steps_per_epoch: int,
    total_iterations: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based).

    * ``constant``: 1 — the paper's constant step size.
    * ``multistep``: ``gamma ** (#milestones passed)``; milestones are epochs (the paper's
      CIFAR recipe: x0.1 at epochs 150 and 225).
    * ``sqrt``: ``1 / sqrt(1 + t)`` and ``inverse``: ``1 / (1 + t)``, the diminishing step
      sizes of the convergence analysis, with t = iteration / steps_per_epoch (epochs so far).
    * ``cosine``: half a cosine from 1 to 0 over the run.
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
        return 0.5 * (1.0 + math.cos(math.pi * min(iteration, total_iterations) / total_iterations))
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
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """An ``optimizer -> LambdaLR`` factory stepped once per iteration/clock.

    ``warmup_epochs`` multiply the lr by ``warmup_factor`` for the first epochs: He et al.
    train ResNet-110 at 0.01 before switching to 0.1, and so does the DDG paper.
    """
    factor = schedule_factor(schedule, steps_per_epoch, epochs, milestones, gamma,
                             warmup_epochs=warmup_epochs, warmup_factor=warmup_factor)
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
) -> Callable[[int], float]:
    """The multiplier of the base lr at each iteration: what :func:`make_lr_scheduler` runs,
    so ``base_lr * schedule_factor(...)(t)`` is exactly the lr every stage uses at clock t."""
    if schedule not in LR_SCHEDULES:
        raise UsageError(
            f"unknown LR schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
        )
    bad = [m for m in milestones if m < 1]
    if bad:  # milestones past the last epoch are allowed: a shortened run of a recipe
        raise UsageError(f"LR milestones must be epochs >= 1 (got {bad})")
    if not 0 < gamma <= 1:
        raise UsageError(f"--lr-gamma must be in (0, 1] (got {gamma})")
    total = steps_per_epoch * epochs
    milestones = tuple(milestones)

    warmup_iterations = warmup_epochs * steps_per_epoch

    def factor(i: int) -> float:
        scale = warmup_factor if i < warmup_iterations else 1.0
        return scale * lr_factor(schedule, i, steps_per_epoch, total, milestones, gamma)

    return factor
