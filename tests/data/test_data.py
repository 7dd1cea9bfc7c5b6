"""Data sets, the safe CIFAR reader, augmentation and the loader's resumable order."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from ddgpipe.data import BatchLoader, load_dataset, random_crop_flip
from ddgpipe.errors import UsageError
from tests.cifar_files import write_cifar10, write_cifar100


def test_digits_split_and_normalisation():
    data = load_dataset("digits")
    assert data.train_x.shape == (1437, 1, 8, 8) and data.test_x.shape == (360, 1, 8, 8)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert abs(float(data.train_x.mean())) < 1e-5 and abs(float(data.train_x.std()) - 1) < 1e-3
    assert set(data.train_y.tolist()) == set(range(10)) and not data.augment
    again = load_dataset("digits")
    assert torch.equal(data.train_x, again.train_x) and torch.equal(data.test_y, again.test_y)


def test_cifar10_round_trip(tmp_path):
    data = load_dataset("cifar10", str(write_cifar10(tmp_path)))
    assert data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32)
    assert data.num_classes == 10 and data.augment
    assert torch.allclose(data.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    # The pixel layout is row-major C x H x W, as in the official files.
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes(),
                       encoding="bytes")
    first = raw[b"data"][0].reshape(3, 32, 32).astype(np.float32)
    got = data.train_x[0].numpy()
    assert np.corrcoef(first.ravel(), got.ravel())[0, 1] > 0.99
    # data_dir may also point at the batches folder itself.
    inner = load_dataset("cifar10", str(tmp_path / "cifar-10-batches-py"))
    assert torch.equal(inner.train_x, data.train_x)


def test_cifar100_round_trip(tmp_path):
    data = load_dataset("cifar100", str(write_cifar100(tmp_path)))
    assert data.train_x.shape == (40, 3, 32, 32) and data.num_classes == 100
    assert data.test_x.shape == (20, 3, 32, 32) and data.in_channels == 3 and data.augment
    assert data.train_y.dtype == torch.int64 and int(data.train_y.max()) < 100
    assert torch.allclose(data.train_x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)


def test_synthetic():
    data = load_dataset("synthetic")
    assert data.train_x.shape == (2048, 3, 32, 32) and data.test_x.shape == (512, 3, 32, 32)
    assert data.num_classes == 10 and not data.augment
    assert torch.equal(data.train_y, load_dataset("synthetic").train_y)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "test_batch").unlink(), "missing CIFAR file"),
        (lambda d: (d / "data_batch_3").write_bytes((d / "data_batch_3").read_bytes()[:500]),
         "data_batch_3 .*corrupt or truncated"),
        (lambda d: (d / "data_batch_2").write_bytes(b"not a pickle"), "data_batch_2"),
        (lambda d: (d / "data_batch_1").write_bytes(pickle.dumps(
            {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2)),
         "data_batch_1 has images of shape"),
        (lambda d: (d / "data_batch_1").write_bytes(pickle.dumps(
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=2)),
         "labels outside 0..9"),
        (lambda d: (d / "data_batch_4").write_bytes(pickle.dumps(
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, protocol=2)),
         "data_batch_4 holds data or labels that are not arrays"),
        (lambda d: (d / "data_batch_5").write_bytes(pickle.dumps([1, 2], protocol=2)),
         "data_batch_5 holds a list"),
    ],
)
def test_damaged_cifar_files_are_named(tmp_path, damage, message):
    write_cifar10(tmp_path)
    damage(tmp_path / "cifar-10-batches-py")
    with pytest.raises(UsageError, match=message):
        load_dataset("cifar10", str(tmp_path))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(
        pickle.dumps({b"data": _Exploit(marker)}, protocol=2))
    with pytest.raises(UsageError, match="refusing to load .*data_batch_1: it asks to import "
                                         "(posix|os|nt).system"):
        load_dataset("cifar10", str(tmp_path))
    assert not marker.exists()


def test_missing_data_dirs(tmp_path):
    with pytest.raises(UsageError, match="--data-dir is required for cifar100"):
        load_dataset("cifar100")
    with pytest.raises(UsageError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "nowhere"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        load_dataset("cifar10", str(tmp_path / "afile"))
    with pytest.raises(UsageError, match="has no cifar-10-batches-py/ folder"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(UsageError, match="unknown data set 'svhn'"):
        load_dataset("svhn")


def test_crop_flip_keeps_shape_and_takes_pixels_from_the_padded_input():
    x = torch.arange(1.0, 1 + 8 * 3 * 32 * 32).reshape(8, 3, 32, 32)
    out = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    values = set(x.flatten().tolist()) | {0.0}
    assert set(out.flatten().tolist()) <= values
    assert not torch.equal(out, x)
    same = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)


def test_crop_flip_is_a_pure_flip_when_pad_is_zero():
    x = torch.randn(64, 1, 4, 4)
    out = random_crop_flip(x, torch.Generator().manual_seed(1), pad=0)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


def test_loader_is_deterministic_and_resumable():
    x, y = torch.randn(100, 3, 8, 8), torch.arange(100)
    loader = BatchLoader(x, y, 16, seed=3, augment=True)
    assert len(loader) == 6
    first = list(loader.epoch(2))
    again = list(loader.epoch(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, again, strict=True))
    tail = list(loader.epoch(2, start=4))
    assert len(tail) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[4:], tail, strict=True))
    other = list(loader.epoch(3))
    assert not torch.equal(first[0][1], other[0][1])
    seen = torch.cat([b[1] for b in first])
    assert len(set(seen.tolist())) == 96  # no sample twice in an epoch
    # A fresh loader (a resumed run) gives the same batches: nothing depends on history.
    fresh = list(BatchLoader(x, y, 16, seed=3, augment=True).epoch(2, start=5))
    assert torch.equal(fresh[0][0], first[5][0]) and torch.equal(fresh[0][1], first[5][1])
    # Augmentation changed the images it batched.
    assert not torch.equal(first[0][0], x[first[0][1]])
    assert not torch.equal(list(BatchLoader(x, y, 16, seed=4).epoch(2))[0][1], first[0][1])


def test_loader_without_shuffle_or_drop_last_covers_everything():
    x, y = torch.randn(10, 2), torch.arange(10)
    loader = BatchLoader(x, y, 4, shuffle=False, drop_last=False)
    batches = list(loader.epoch(0))
    assert len(loader) == 3 and [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)


def test_loader_batch_size_errors():
    x, y = torch.randn(10, 2), torch.arange(10)
    with pytest.raises(UsageError, match="batch size 11 is larger than the 10 training samples"):
        BatchLoader(x, y, 11)
    with pytest.raises(UsageError, match="batch size must be >= 1"):
        BatchLoader(x, y, 0)
    with pytest.raises(UsageError, match="10 training samples of digits; pass a smaller"):
        BatchLoader(x, y, 11, name="digits")
    with pytest.raises(UsageError, match="10 inputs but 9 labels"):
        BatchLoader(x, y[:9], 2)
