"""Mixed precision for pipeline stages: autocast per stage, and loss scaling that survives delay.

Why and how: ``docs/design.md``, "Mixed precision and delayed loss scaling".
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from ddgpipe.errors import UsageError

__all__ = ["PRECISIONS", "check_precision", "autocast", "LossScaler", "unscale_"]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` on ``device`` (no context for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def unscale_(grads: list[Tensor], scale: float) -> bool:
    """Divide ``grads`` by ``scale`` in place; True when any holds an inf or NaN."""
    if not grads:
        return False
    found = torch.zeros(1, device=grads[0].device)
    inv = torch.full((1,), 1.0 / scale, device=grads[0].device)
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, group in by_device.items():
        found_here = found.to(device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_here, inv.to(device))
        found = found + found_here.to(found.device)
    return bool(found.item())


class LossScaler:
    """The fp16 loss scale, owned by the last stage: GradScaler's dynamic rule, per clock."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.clean_clocks = 0

    def update(self, overflow: bool) -> None:
        """End of a clock: halve after an overflow anywhere, grow after enough clean clocks."""
        if overflow:
            self.scale *= self.backoff_factor
            self.clean_clocks = 0
            return
        self.clean_clocks += 1
        if self.clean_clocks == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_clocks = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_clocks": self.clean_clocks}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_clocks = int(state["clean_clocks"])
