"""Random state: the process's, and one random stream (rng) per pipeline stage.

Why and how: ``docs/design.md``, "Random streams".
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["rng_state", "set_rng_state", "rng_kept", "same_rng_state", "StageRngs", "RngUse",
           "stage_rng", "StageStreams", "stage_stream", "draws_random_numbers",
           "RANDOM_MODULES"]

RANDOM_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.RReLU,
)
"""Modules of torch that draw from the global generator in training mode."""


def _cuda_indices(devices: Iterable[torch.device] | None) -> list[int]:
    if not torch.cuda.is_initialized():
        return []
    if devices is None:
        return list(range(torch.cuda.device_count()))
    return sorted({d.index if d.index is not None else torch.cuda.current_device()
                   for d in devices if d.type == "cuda"})


def rng_state(devices: Iterable[torch.device] | None = None) -> dict:
    """The CPU generator's state and, when CUDA is initialised, that of ``devices``' GPUs
    (None: every GPU)."""
    state: dict = {"cpu": torch.get_rng_state()}
    cuda = _cuda_indices(devices)
    if cuda:
        state["cuda"] = {i: torch.cuda.get_rng_state(i) for i in cuda}
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    for index, value in state.get("cuda", {}).items():
        torch.cuda.set_rng_state(value, int(index))


def same_rng_state(a: dict, b: dict) -> bool:
    """Whether two states are equal: has anything been drawn between them?"""
    if not torch.equal(a["cpu"], b["cpu"]):
        return False
    ca, cb = a.get("cuda", {}), b.get("cuda", {})
    return ca.keys() == cb.keys() and all(torch.equal(ca[i], cb[i]) for i in ca)


@contextmanager
def rng_kept(devices: Iterable[torch.device] | None = None) -> Iterator[None]:
    """Run the block, then put the random state (CPU, and ``devices``' GPUs) back as it was."""
    saved = rng_state(devices)
    try:
        yield
    finally:
        set_rng_state(saved)


def draws_random_numbers(module: nn.Module) -> bool:
    """Whether ``module`` holds a layer known to draw random numbers when training.

    A custom layer that draws (``torch.rand`` and the like in its forward) can say so with
    an attribute ``draws_random_numbers = True``.
    """
    return any(isinstance(m, RANDOM_MODULES) or getattr(m, "draws_random_numbers", False)
               for m in module.modules())


_GENERATOR_LOCK = threading.RLock()
"""Held while a stage's stream is swapped into the process's generator: one lock for every
pipeline of the process, since they all share that generator."""


def stage_rng(base: dict, stage: int) -> dict:
    """Stage ``stage``'s random stream, derived from ``base`` (the caller's state at the first
    clock) and the stage's index, so no two stages draw the same numbers.

    Stage 0 keeps ``base`` itself: with one stage, DDG draws exactly what backprop draws.
    Stage k >= 1 starts every generator (the CPU's and each GPU's in ``base``) from a seed
    hashed from the CPU state's bytes and k: the same on every executor and in every process
    that starts from the same state.
    """
    if stage == 0:
        return base
    digest = hashlib.sha256(base["cpu"].numpy().tobytes() + stage.to_bytes(4, "little"))
    seed = int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)
    derived: dict = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if "cuda" in base:
        derived["cuda"] = {i: torch.Generator(device=f"cuda:{int(i)}").manual_seed(seed)
                           .get_state() for i in base["cuda"]}
    return derived


class StageRngs:
    """One random stream per stage, each derived at the first clock from the caller's state
    and the stage's index (:func:`stage_rng`).

    The swap puts the caller's state back after each use; a caller that draws from (or seeds)
    the global generator on another thread *while* stages of a threaded pipeline run races
    with them, so callers wait for the pipeline first (``pipe.sync()``, ``pipe.eval()``).
    """

    def __init__(self, devices: list[torch.device]):
        self.devices = devices
        self.states: list[dict] | None = None
        self.lock = _GENERATOR_LOCK
        # the caller's CPU state as the last swap put it back: if it has moved when the next
        # swap begins, someone drew from the process's generator outside the swaps
        self._restored: torch.Tensor | None = None
        self.foreign_draws = False

    def start(self) -> None:
        """Derive every stage's stream from the caller's current state (once)."""
        if self.states is None:
            base = rng_state(self.devices)
            self.states = [stage_rng(base, k) for k in range(len(self.devices))]

    def idle(self) -> None:
        """No stage runs now (the caller waited for them): draws until the next swap are the
        caller's own business, not a race."""
        with self.lock:
            self._restored = None

    def check_caller(self) -> bool:
        """Whether the caller has drawn from the global generator since the last swap put its
        state back (checked under the lock, so no swap is half done). A draw that lands
        inside a swap takes from that stage's stream instead and cannot be told apart."""
        with self.lock:
            if self._restored is not None and not torch.equal(torch.get_rng_state(),
                                                              self._restored):
                self.foreign_draws = True
        return self.foreign_draws

    @contextmanager
    def use(self, stage: int) -> Iterator[RngUse]:
        """Draw from ``stage``'s stream inside the block. The yielded record's ``drew`` says,
        after the block, whether it drew any random number."""
        assert self.states is not None, "start() derives the streams first"
        with self.lock:
            saved = rng_state(self.devices)
            if self._restored is not None and not torch.equal(saved["cpu"], self._restored):
                self.foreign_draws = True
            record = RngUse()
            before = self.states[stage]
            set_rng_state(before)
            try:
                yield record
            finally:
                after = rng_state(self.devices)
                self.states[stage] = after
                record.drew = not same_rng_state(before, after)
                set_rng_state(saved)
                self._restored = saved["cpu"]


class RngUse:
    """What :meth:`StageRngs.use` learnt about the block it ran."""

    drew = False


# the names of before random streams were told apart from CUDA streams by name
StageStreams = StageRngs
stage_stream = stage_rng
