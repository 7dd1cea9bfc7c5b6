"""Time each block of a Sequential: the input to balanced cuts and to the cost model."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from torch import nn

from ddgpipe.core.rng import rng_state, set_rng_state
from ddgpipe.core.values import (
    Value,
    as_args,
    check_value,
    grad_probe,
    handed_on,
    leaves,
    tensors,
)

__all__ = ["BlockProfile", "profile_blocks"]


@dataclass(frozen=True)
class BlockProfile:
    """One block's forward and backward seconds on a sample batch, its output size and the
    size of its trainable parameters (what a gradient average moves)."""

    forward_s: float
    backward_s: float
    output_bytes: int
    param_bytes: int = 0


def profile_blocks(
    model: nn.Sequential, sample_input: Value, repeats: int = 5, warmup: int = 2
) -> list[BlockProfile]:
    """Median forward and backward time per block (weights, stats and RNG left untouched)."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    rng = rng_state()
    was_training = model.training
    model.train()
    fwd: list[list[float]] = [[] for _ in model]
    bwd: list[list[float]] = [[] for _ in model]
    sizes = [0] * len(model)
    try:
        for rep in range(warmup + repeats):
            x = sample_input
            for i, block in enumerate(model):
                # floating inputs carry gradients, except the data into the first block
                inp = leaves(handed_on(x, floating=True), grad=i > 0)
                t0 = time.perf_counter()
                out = check_value(block(*as_args(inp)), f"block {i} ({type(block).__name__})")
                t1 = time.perf_counter()
                probe = grad_probe(out)
                if probe is not None:
                    probe.backward()
                t2 = time.perf_counter()
                if rep >= warmup:
                    fwd[i].append(t1 - t0)
                    bwd[i].append(t2 - t1)
                sizes[i] = sum(t.numel() * t.element_size() for t in tensors(out))
                x = handed_on(out)
    finally:
        model.load_state_dict(saved)
        set_rng_state(rng)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    params = [sum(p.numel() * p.element_size() for p in block.parameters() if p.requires_grad)
              for block in model]
    return [BlockProfile(statistics.median(f), statistics.median(b), s, n)
            for f, b, s, n in zip(fwd, bwd, sizes, params, strict=True)]
