"""CIFAR-10/100 from the official python-pickle archives, unpickled safely.

The batch files are pickles, and a pickle can run any code when loaded. The unpickler here
accepts only the handful of numpy names a genuine batch file uses to rebuild its arrays, so
a crafted or corrupted file is refused with a clear message instead of being executed.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from ddgpipe.data.dataset import Dataset
from ddgpipe.errors import UsageError

__all__ = ["load_cifar", "SafeUnpickler", "read_batch", "LAYOUTS"]

# name -> (folder in the archive, training files, test files, label key, classes)
LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Python 3 writes bytes in protocol 2 as _codecs.encode(text, "latin1"); the official
    # Python 2 files do not need it, but re-saved copies (and the test fixtures) do.
    ("_codecs", "encode"),
}


class UnsafePickleError(Exception):
    """Raised by :class:`SafeUnpickler` for a name outside the allow-list; never escapes."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")


class SafeUnpickler(pickle.Unpickler):
    """Only rebuilds numpy arrays, dtypes and builtin containers; anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(module, name)


def read_batch(path: Path) -> dict:
    """One batch file as a dict with str keys; UsageError naming the file when it is bad."""
    if not path.is_file():
        raise UsageError(f"missing CIFAR file {path}; re-extract the official python archive "
                         "there")
    try:
        raw = SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except UnsafePickleError as e:
        raise UsageError(f"refusing to load {path}: it asks to import {e}, which a CIFAR batch "
                         "file never does; re-download the data set") from None
    except Exception as e:  # truncated or not a pickle at all
        raise UsageError(f"cannot read {path} ({type(e).__name__}: {e}); the file is corrupt or "
                         "truncated, re-download the data set") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path} holds a {type(raw).__name__}, not a CIFAR batch dict; "
                         "re-download the data set")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _arrays(path: Path, label_key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = read_batch(path)
    if "data" not in batch or label_key not in batch:
        raise UsageError(f"{path} lacks 'data' or '{label_key}'; is it a {classes}-class CIFAR "
                         "file? re-download the data set")
    try:
        data = np.asarray(batch["data"])
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{path} holds data or labels that are not arrays of numbers ({e}); "
                         "re-download the data set") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UsageError(f"{path} has images of shape {data.shape} ({data.dtype}), expected "
                         "N x 3072 uint8; re-download the data set")
    in_range = labels.min(initial=0) >= 0 and labels.max(initial=0) < classes
    if labels.shape != (len(data),) or not in_range:
        raise UsageError(f"{path} has {labels.shape} labels outside 0..{classes - 1} or not one "
                         "per image; re-download the data set")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, data_dir: str | Path | None) -> Dataset:
    """CIFAR-10 or -100 from ``data_dir`` (holding the archive's folder, or that folder)."""
    folder, train_files, test_files, label_key, classes = LAYOUTS[name]
    if data_dir is None:
        raise UsageError(f"--data-dir is required for {name}: point it at the folder holding "
                         f"{folder}/ (the official python archive, extracted)")
    root = Path(data_dir)
    if not root.exists():
        raise UsageError(f"--data-dir {root} does not exist; point it at the folder holding "
                         f"{folder}/")
    if not root.is_dir():
        raise UsageError(f"--data-dir {root} is a file, not a folder; point it at the folder "
                         f"holding {folder}/")
    base = root if root.name == folder else root / folder
    if not base.is_dir():
        raise UsageError(f"{root} has no {folder}/ folder; extract the official {name} python "
                         "archive there")
    train = [_arrays(base / f, label_key, classes) for f in train_files]
    test = [_arrays(base / f, label_key, classes) for f in test_files]
    train_x = np.concatenate([x for x, _ in train]).astype(np.float32) / 255.0
    test_x = np.concatenate([x for x, _ in test]).astype(np.float32) / 255.0
    # Per-channel statistics of the training images; normalised in place to spare memory.
    mean = train_x.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    std = train_x.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    std += 1e-8
    for x in (train_x, test_x):
        x -= mean
        x /= std
    return Dataset(
        name,
        torch.from_numpy(train_x),
        torch.from_numpy(np.concatenate([y for _, y in train])),
        torch.from_numpy(test_x),
        torch.from_numpy(np.concatenate([y for _, y in test])),
        num_classes=classes, in_channels=3, image_size=32, augment=True,
    )
