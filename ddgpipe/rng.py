"""The process's random state as one value: the CPU generator's, and every GPU's once CUDA
is in use. A stage's own stream in the reference executor, a block profile and a tuning run
all save and restore it, so none of them leaves a trace in the numbers training draws."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["rng_state", "set_rng_state", "rng_kept"]


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def rng_kept() -> Iterator[None]:
    """Run the block, then put the random state back as it was."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)
