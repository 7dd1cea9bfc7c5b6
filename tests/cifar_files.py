"""Tiny CIFAR-10/100 archives in the official python-pickle layout, for tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _write(path: Path, data: np.ndarray, labels: list[int], label_key: bytes) -> None:
    # The official files were written by Python 2: protocol 2 and bytes keys.
    with path.open("wb") as f:
        pickle.dump({b"batch_label": b"test", b"data": data, label_key: labels}, f, protocol=2)


def write_cifar10(root: Path, n_per_batch: int = 20, seed: int = 0) -> Path:
    """Five training batches and one test batch; returns the folder to pass as --data-dir."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        _write(folder / name, data, rng.integers(0, 10, n_per_batch).tolist(), b"labels")
    return root


def write_cifar100(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> Path:
    """One training file and one test file of 100-class images; returns the --data-dir."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        _write(folder / name, data, rng.integers(0, 100, n).tolist(), b"fine_labels")
    return root
