"""What the runtime tests share: feeding a pipeline as one rank does, and reading its weights."""

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def run_clocks(pipe, rank: int, world: int, batches: list[tuple[Tensor, Tensor]]) -> list:
    """Feed every batch as rank ``rank`` of ``world`` does (the first stage gets x, the last y
    and the loss), drain, and return the losses this rank saw (None on the other ranks)."""
    losses = []
    first, last = rank == 0, rank == world - 1
    for x, y in batches:
        loss = pipe.step(x if first else None, y if last else None,
                         F.cross_entropy if last else None)
        losses.append(None if loss is None else loss.item())
    pipe.drain()
    return losses


def local_stage_arrays(pipe) -> dict[str, np.ndarray]:
    """This rank's stage weights and buffers as arrays, to send back from a worker process."""
    return {k: v.detach().cpu().numpy().copy()
            for k, v in pipe.stages[0].module.state_dict().items()}


def assert_runtime_matches_reference(results: list[dict], build_reference, batches) -> None:
    """Train the reference executor on one thread, as each worker did, on the same batches;
    the last rank's losses and every stage's weights and buffers must be bitwise equal."""
    torch.set_num_threads(1)
    try:
        reference = build_reference()
        assert reference.executor_kind == "reference", "compare with the reference executor"
        losses = run_clocks(reference, 0, 1, batches)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert results[-1]["losses"] == losses
    for stage, result in zip(reference.stages, results, strict=True):
        for name, value in stage.module.state_dict().items():
            assert torch.equal(value.cpu(), torch.from_numpy(result["state"][name])), name
