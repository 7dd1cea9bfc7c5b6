"""Minibatches from in-memory tensors, with the CIFAR augmentation done in torch.

The batch order and the augmentation of epoch e depend only on (seed, e), never on what ran
before, so a run resumed at epoch e, batch s sees exactly the batches an uninterrupted run
would have seen. Each batch draws its augmentation from its own generator, so resuming skips
the earlier batches without augmenting them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ddgpipe.errors import UsageError

__all__ = ["BatchLoader", "random_crop_flip"]

_EPOCH_STRIDE = 1_000_003


def random_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Zero-pad by ``pad``, crop back to size at a random offset, flip half the images.

    ``x`` is N x C x H x W; offsets and flips are drawn per sample from ``generator`` (a CPU
    generator), and the crop is one gather, not a loop over samples.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)[None, :]                          # n x h
    cols = dx[:, None] + torch.arange(w)[None, :]                          # n x w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None]
    index = tuple(i.to(x.device) for i in (batch, rows[:, :, None], cols[:, None, :]))
    out = padded.permute(0, 2, 3, 1)[index]                                # n x h x w x c
    return out.permute(0, 3, 1, 2).contiguous()


class BatchLoader:
    """Shuffled minibatches of ``(x, y)``; by default the last partial batch is dropped.

    ``name`` (the data set's) only makes the batch-size error clearer.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool = True,
                 seed: int = 0, augment: bool = False, drop_last: bool = True,
                 name: str | None = None):
        if len(x) != len(y):
            raise UsageError(f"{len(x)} inputs but {len(y)} labels; pass one label per input")
        if batch_size < 1:
            raise UsageError(f"batch size must be >= 1 (got {batch_size}); pass a positive "
                             "--batch-size")
        if batch_size > len(x):
            of = f" of {name}" if name else ""
            raise UsageError(f"batch size {batch_size} is larger than the {len(x)} training "
                             f"samples{of}; pass a smaller --batch-size")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle, self.seed, self.augment, self.drop_last = shuffle, seed, augment, drop_last

    def to(self, device: torch.device | str) -> BatchLoader:
        """Gather and augment batches on ``device``: on a GPU the whole set is copied there
        once (through pinned memory), so no batch crosses the bus again. The batches, and
        their augmentation (drawn from CPU generators), are the same on every device."""
        device = torch.device(device)
        if device.type == "cuda" and self.x.device != device:
            self.x = self.x.pin_memory().to(device, non_blocking=True)
            self.y = self.y.pin_memory().to(device, non_blocking=True)
        return self

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, e: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of epoch ``e`` from batch index ``start`` on (the tail of ``epoch(e)``)."""
        gen = torch.Generator().manual_seed(self.seed * _EPOCH_STRIDE + e)
        n = len(self.x)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        # One number from the epoch's generator seeds every batch's augmentation generator.
        aug_base = int(torch.randint(0, 2**62, (1,), generator=gen))
        for i in range(max(start, 0), len(self)):
            idx = order[i * self.batch_size: (i + 1) * self.batch_size].to(self.x.device)
            x = self.x[idx]
            if self.augment:
                x = random_crop_flip(x, torch.Generator().manual_seed(aug_base + i))
            yield x, self.y[idx]
