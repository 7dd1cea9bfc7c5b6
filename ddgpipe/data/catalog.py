"""The data sets ddgpipe trains on, each returned whole as tensors.

The default, scikit-learn's handwritten digits (1797 real 8x8 scans), ships inside a package,
so the demo and the tests run anywhere with no download. CIFAR-10/100 are read from the
official python archives when a user has them; MNIST-1D, 1-D signals that separate models
better than the digits do, is generated offline by a seeded generator and cached
(``mnist1d.py``); a synthetic set feeds the benchmarks, where only throughput matters.
"""

from __future__ import annotations

import numpy as np
import torch

from ddgpipe.data.dataset import Dataset
from ddgpipe.data.user import is_user_data, load_user_data
from ddgpipe.errors import UsageError

__all__ = ["DATASET_NAMES", "load_dataset", "digits", "synthetic"]

DATASET_NAMES = ("digits", "mnist1d", "cifar10", "cifar100", "shakespeare", "synthetic")


def load_dataset(name: str, data_dir: str | None = None, context: int = 128,
                 tokenizer: str | None = None) -> Dataset:
    """Load a data set by name; CIFAR needs ``data_dir`` (the extracted official archive).

    mnist1d is generated on first use and then read from the cache (``mnist1d.py``);
    shakespeare is a byte corpus in windows of ``context`` tokens (``text.py``); a user's
    ``text:PATH`` (bytes, or ``tokenizer``'s ids) or ``tensors:PATH`` is read by ``user.py``.
    """
    if is_user_data(name):
        return load_user_data(name, context, tokenizer)
    if name == "shakespeare":
        from ddgpipe.data.text import load_text

        return load_text(name, context)
    if name == "digits":
        return digits()
    if name == "synthetic":
        return synthetic()
    if name == "mnist1d":
        from ddgpipe.data.mnist1d import load_mnist1d

        return load_mnist1d()
    if name in ("cifar10", "cifar100"):
        from ddgpipe.data.cifar import load_cifar

        return load_cifar(name, data_dir)
    raise UsageError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}, "
                     "or text:PATH or tensors:PATH for your own")


def digits(train_size: int = 1437) -> Dataset:
    """scikit-learn's 8x8 digits; a fixed seeded split (1437 train / 360 test)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:train_size], order[train_size:]
    mean, std = images[train].mean(), images[train].std()
    x = torch.from_numpy((images - mean) / std).unsqueeze(1)
    y = torch.from_numpy(labels)
    return Dataset("digits", x[train].contiguous(), y[train], x[test].contiguous(), y[test],
                   num_classes=10, in_channels=1, image_size=8)


def synthetic(train_size: int = 2048, test_size: int = 512, image_size: int = 32,
              channels: int = 3, num_classes: int = 10, seed: int = 0) -> Dataset:
    """Random images and labels: for throughput measurements, not for learning."""
    gen = torch.Generator().manual_seed(seed)
    n = train_size + test_size
    x = torch.randn(n, channels, image_size, image_size, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return Dataset("synthetic", x[:train_size], y[:train_size], x[train_size:], y[train_size:],
                   num_classes=num_classes, in_channels=channels, image_size=image_size)
