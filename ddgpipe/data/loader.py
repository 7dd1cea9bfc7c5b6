"""Minibatches from in-memory tensors, with the CIFAR augmentation done in torch.

The batch order and the augmentation of epoch e depend only on (seed, e), never on what ran
before, so a run resumed at epoch e, batch s sees exactly the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ddgpipe.errors import UsageError

__all__ = ["BatchLoader", "random_crop_flip"]


def random_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Zero-pad by ``pad``, crop back to size at a random offset, flip half the images."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :])                       # n x h
    cols = dx[:, None] + torch.arange(w)[None, :]                         # n x w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class BatchLoader:
    """Shuffled full minibatches of ``(x, y)``; the last partial batch is dropped."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool = True,
                 seed: int = 0, augment: bool = False, drop_last: bool = True):
        if len(x) != len(y):
            raise UsageError(f"{len(x)} inputs but {len(y)} labels")
        if not 1 <= batch_size <= len(x):
            raise UsageError(f"batch size {batch_size} is larger than the {len(x)} training "
                             "samples; pass a smaller --batch-size" if batch_size > len(x) else
                             f"batch size must be >= 1 (got {batch_size})")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle, self.seed, self.augment, self.drop_last = shuffle, seed, augment, drop_last

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, e: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of epoch ``e`` from batch index ``start`` on."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        order = torch.randperm(len(self.x), generator=gen) if self.shuffle else \
            torch.arange(len(self.x))
        aug = torch.Generator().manual_seed(self.seed * 1_000_003 + e + 7_919_000)
        for i in range(len(self)):
            idx = order[i * self.batch_size: (i + 1) * self.batch_size]
            x = self.x[idx]
            if self.augment:
                x = random_crop_flip(x, aug)  # drawn for every batch so the tail is the same
            if i >= start:
                yield x, self.y[idx]
