"""MNIST-1D (Greydanus 2020, "Scaling down deep learning", arXiv 2011.14439), made offline.

Why and how: ``docs/design.md``, "MNIST-1D, made offline".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from ddgpipe.cache import CACHE_ENV, cache_dir
from ddgpipe.data.dataset import Dataset
from ddgpipe.errors import UsageError

__all__ = ["GENERATION_ARGS", "CACHE_ENV", "load_mnist1d", "mnist1d_arrays", "cache_dir",
           "cache_file", "split_sizes"]


# The package's defaults (get_dataset_args(), the paper's) with a larger set split in half.
GENERATION_ARGS: dict = {
    "num_samples": 8000,       # default 5000
    "train_split": 0.5,        # default 0.8: 4000 train (as in the paper) / 4000 test
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 0.02,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}

_KEYS = ("x", "y", "x_test", "y_test")


class CorruptCacheError(Exception):
    """A cache file that cannot be used; the loader regenerates it."""


def split_sizes(args: dict) -> tuple[int, int]:
    """(training, test) sizes ``make_dataset`` gives for ``args``: whole samples per class,
    then the first ``train_split`` of them for training."""
    total = args["num_samples"] // 10 * 10
    train = int(total * args["train_split"])
    return train, total - train


def _generator_version() -> str:
    versions = []
    for package in ("mnist1d", "scipy"):
        try:
            versions.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            raise UsageError(f"--data mnist1d needs the {package} package, which is not "
                             "installed; run `pip install -r requirements.txt`") from None
    return " ".join(versions)


def _fingerprint(args: dict) -> str:
    """What the cached arrays depend on, as canonical JSON: the arguments and the generator."""
    return json.dumps({"args": args, "generator": _generator_version()}, sort_keys=True)


def cache_file(args: dict = GENERATION_ARGS, folder: Path | None = None) -> Path:
    """The cache file for ``args`` in ``folder`` (default :func:`cache_dir`)."""
    key = hashlib.sha256(_fingerprint(args).encode()).hexdigest()[:16]
    return (folder if folder is not None else cache_dir()) / f"mnist1d-{key}.npz"


def generate(args: dict) -> dict[str, np.ndarray]:
    """Run the package's seeded generator; the global RNGs it reseeds are put back after."""
    try:
        from mnist1d.data import make_dataset
        from mnist1d.utils import ObjectView
    except ImportError as e:
        raise UsageError(f"--data mnist1d needs the mnist1d package ({e}); run "
                         "`pip install -r requirements.txt`") from None
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(made[k]) for k in _KEYS}


def _check(arrays: dict[str, np.ndarray], args: dict) -> None:
    """Raise CorruptCacheError unless the arrays are what ``args`` generate, in shape and type."""
    sizes = dict(zip(("x", "x_test"), split_sizes(args)))
    length = args["final_seq_length"]
    for part, n in sizes.items():
        x, y = arrays[part], arrays[part.replace("x", "y")]
        if x.dtype != np.float64 or x.shape != (n, length) or not np.isfinite(x).all():
            raise CorruptCacheError(f"{part} is {x.dtype} {x.shape}, expected finite float64 "
                                    f"({n}, {length})")
        if y.dtype != np.int64 or y.shape != (n,) or (n and not 0 <= y.min() <= y.max() < 10):
            raise CorruptCacheError(f"labels of {part} are not {n} integers in 0..9")


def _read(path: Path, args: dict) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):  # np.load would take it for a pickle and say so
        raise CorruptCacheError("not an npz archive: truncated or overwritten")
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = str(npz["fingerprint"])
            arrays = {k: npz[k] for k in _KEYS}
    except Exception as e:  # a bad CRC, a missing array, a damaged npy header ...
        raise CorruptCacheError(f"{type(e).__name__}: {e}") from None
    if stored != _fingerprint(args):
        raise CorruptCacheError("it was made with other generation arguments")
    _check(arrays, args)
    return arrays


def _write_atomic(path: Path, arrays: dict[str, np.ndarray], args: dict) -> None:
    """Write the npz to a temporary file in the same folder, fsync it, rename it into place."""
    buf = io.BytesIO()
    np.savez(buf, fingerprint=np.array(_fingerprint(args)), **arrays)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared cache from its other users
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mnist1d_arrays(args: dict = GENERATION_ARGS,
                   folder: Path | None = None) -> dict[str, np.ndarray]:
    """The generator's arrays (``x``, ``y``, ``x_test``, ``y_test``) for ``args``, from the
    cache when it holds a sound copy, else generated and cached."""
    path = cache_file(args, folder)
    if path.exists():
        try:
            return _read(path, args)
        except CorruptCacheError as e:
            print(f"ddgpipe: the mnist1d cache {path} is unusable ({e}); generating it again",
                  file=sys.stderr)
    arrays = generate(args)
    try:
        _check(arrays, args)
    except CorruptCacheError as e:  # another mnist1d than the pinned one, say
        raise UsageError(f"the mnist1d generator returned unexpected arrays ({e}); install the "
                         "pinned version: pip install -r requirements.txt") from None
    try:
        _write_atomic(path, arrays, args)
    except OSError as e:
        print(f"ddgpipe: cannot cache mnist1d in {path.parent} ({e.strerror or e}); using it "
              f"uncached, so it is generated again next time: set {CACHE_ENV} to a writable "
              "folder", file=sys.stderr)
    return arrays


def load_mnist1d(args: dict = GENERATION_ARGS, folder: Path | None = None) -> Dataset:
    """MNIST-1D as a :class:`Dataset` of N x 1 x 40 signals, normalised by the training split's
    mean and standard deviation (one channel: two numbers). No augmentation."""
    arrays = mnist1d_arrays(args, folder)
    train_x = arrays["x"].astype(np.float32)
    test_x = arrays["x_test"].astype(np.float32)
    mean = train_x.mean(dtype=np.float64)
    std = train_x.std(dtype=np.float64) + 1e-8
    train_x = ((train_x - mean) / std).astype(np.float32)[:, None, :]
    test_x = ((test_x - mean) / std).astype(np.float32)[:, None, :]
    return Dataset(
        "mnist1d",
        torch.from_numpy(np.ascontiguousarray(train_x)),
        torch.from_numpy(arrays["y"]),
        torch.from_numpy(np.ascontiguousarray(test_x)),
        torch.from_numpy(arrays["y_test"]),
        num_classes=10, in_channels=1, image_size=None,
    )
