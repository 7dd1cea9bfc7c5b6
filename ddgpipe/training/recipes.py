"""Settings that scale with the run's length, so that a recipe written for one length (AsyncPP's
50 000 steps) keeps its shape over any other: a warm-up share and NAdam's momentum schedule.

Why and how: ``docs/compensation.md``, "AsyncPP's recipe".
"""

from __future__ import annotations

from typing import Protocol

from ddgpipe.errors import UsageError

__all__ = ["ASYNCPP", "ASYNCPP_STEPS", "TORCH_MOMENTUM_DECAY", "check_scaled_settings",
           "momentum_decay_for", "scaled_momentum_decay", "warmup_for", "warmup_iterations"]

#: torch.optim.NAdam's default psi: mu_t = beta1 (1 - 0.5 * 0.96^(t psi))
TORCH_MOMENTUM_DECAY = 0.004
#: the length of AsyncPP's runs: 50 epochs of 1000 minibatches (run.bash)
ASYNCPP_STEPS = 50_000

#: AsyncPP's recipe (PluralisResearch/AsyncPP, run.bash and main_with_runtime.py, "Ours"), as
#: ``ddgpipe train`` flags; ``--preset asyncpp`` sets them
ASYNCPP = dict(optimizer="nadam", lr=3e-4, beta1=0.99, beta2=0.999, weight_decay=0.01,
               clip_grad=10.0, lr_schedule="cosine", lr_floor=0.1, warmup_iters=0,
               warmup_share=3_000 / ASYNCPP_STEPS, nadam_horizon=ASYNCPP_STEPS)


class ScaledSettings(Protocol):
    """The fields of a :class:`ddgpipe.training.TrainConfig` this module reads."""

    optimizer: str
    lr_schedule: str
    lr_floor: float
    warmup_iters: int
    warmup_share: float
    nadam_horizon: int | None


def warmup_iterations(share: float, total: int) -> int:
    """The linear warm-up that takes ``share`` of a ``total``-iteration run, rounded half up
    (and at least one iteration short of the run, where the schedule needs it)."""
    return min(int(share * total + 0.5), total - 1)


def scaled_momentum_decay(horizon: int, total: int,
                          base: float = TORCH_MOMENTUM_DECAY) -> float:
    """NAdam's psi for a ``total``-step run whose mu follows the ``base`` schedule of a
    ``horizon``-step run: ``psi = base * horizon / total``, so mu_t(psi) = mu_{t horizon /
    total}(base), and mu at the run's last step is mu at step ``horizon``."""
    return base * horizon / total


def warmup_for(config: ScaledSettings, total: int) -> int:
    """The run's warm-up in iterations: ``--warmup-iters``, or its ``--warmup-share``."""
    return warmup_iterations(config.warmup_share, total) if config.warmup_share \
        else config.warmup_iters


def momentum_decay_for(config: ScaledSettings, total: int) -> float:
    """NAdam's psi for the run: torch's default, or scaled to ``--nadam-horizon``."""
    if config.nadam_horizon is None:
        return TORCH_MOMENTUM_DECAY
    return scaled_momentum_decay(config.nadam_horizon, total)


def check_scaled_settings(config: ScaledSettings) -> None:
    """Refuse a warm-up given twice, a share or floor outside [0, 1), a floor without cosine,
    a horizon without NAdam."""
    if not 0 <= config.lr_floor < 1 or (config.lr_floor and config.lr_schedule != "cosine"):
        raise UsageError(f"--lr-floor is the fraction of the lr cosine ends at, in [0, 1) and "
                         f"for --lr-schedule cosine only (got {config.lr_floor} with "
                         f"{config.lr_schedule})")
    if not 0 <= config.warmup_share < 1:
        raise UsageError(f"--warmup-share is the fraction of the run spent warming up, in "
                         f"[0, 1) (got {config.warmup_share})")
    if config.warmup_share and config.warmup_iters:
        raise UsageError(f"the warm-up is given twice (--warmup-iters {config.warmup_iters}, "
                         f"--warmup-share {config.warmup_share}); pass one of them")
    horizon = config.nadam_horizon
    if horizon is not None and (isinstance(horizon, bool) or int(horizon) != horizon
                                or horizon < 1):
        raise UsageError(f"--nadam-horizon must be a whole number of steps >= 1 (got "
                         f"{horizon})")
    if horizon is not None and config.optimizer != "nadam":
        raise UsageError(f"--nadam-horizon paces NAdam's momentum schedule; --optimizer "
                         f"{config.optimizer} has none: drop it or use --optimizer nadam")
