"""MNIST-1D: seeded offline generation, the cache, 1-D shapes, and ResNet1D under DDG.

Most tests generate a small variant (200 signals) into a temporary cache folder; one builds
the real set (a few seconds) to pin its sizes.
"""

from __future__ import annotations

import io
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddgpipe
from ddgpipe.data import load_dataset
from ddgpipe.data import mnist1d as m1d
from ddgpipe.data.mnist1d import (
    CACHE_ENV,
    GENERATION_ARGS,
    cache_dir,
    cache_file,
    load_mnist1d,
    mnist1d_arrays,
    split_sizes,
)
from ddgpipe.errors import UsageError
from ddgpipe.models import build_model
from ddgpipe.training import TrainConfig, train

SMALL = dict(GENERATION_ARGS, num_samples=200)  # 100 train / 100 test


def equal_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return load_mnist1d(SMALL, tmp_path_factory.mktemp("cache"))


def test_default_arguments_are_the_papers_with_a_4000_signal_test_set():
    from mnist1d.data import get_dataset_args

    paper = get_dataset_args(as_dict=True)
    changed = {k for k in GENERATION_ARGS if GENERATION_ARGS[k] != paper[k]}
    assert changed == {"num_samples", "train_split"}
    assert set(paper) - set(GENERATION_ARGS) == {"url"}  # the download helper is never used
    assert split_sizes(GENERATION_ARGS) == (4000, 4000)
    assert split_sizes(paper) == (4000, 1000)


def test_the_real_set_has_4000_test_signals_of_1_x_40(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    data = load_dataset("mnist1d")
    assert data.train_x.shape == (4000, 1, 40) and data.test_x.shape == (4000, 1, 40)
    assert data.input_shape == (1, 40) and data.in_channels == 1 and data.image_size is None
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.num_classes == 10 and not data.augment
    assert set(data.test_y.tolist()) == set(range(10))
    assert abs(float(data.train_x.mean())) < 1e-5 and abs(float(data.train_x.std()) - 1) < 1e-3
    assert cache_file(GENERATION_ARGS, tmp_path).is_file()


def test_generation_is_deterministic_and_the_cache_round_trips_bitwise(tmp_path, monkeypatch):
    first = mnist1d_arrays(SMALL, tmp_path)
    assert cache_file(SMALL, tmp_path).is_file()
    assert equal_arrays(first, m1d.generate(SMALL))  # same seed, same signals
    assert not equal_arrays(first, m1d.generate(dict(SMALL, seed=43)))

    def no_generator(args):
        raise AssertionError("a sound cache file must be read, not regenerated")

    monkeypatch.setattr(m1d, "generate", no_generator)
    cached = mnist1d_arrays(SMALL, tmp_path)
    assert equal_arrays(first, cached)
    again = load_mnist1d(SMALL, tmp_path)
    assert again.train_x.shape == (100, 1, 40) and again.test_x.shape == (100, 1, 40)


def test_the_cache_key_follows_the_generation_arguments(tmp_path):
    assert cache_file(SMALL, tmp_path) != cache_file(dict(SMALL, seed=1), tmp_path)
    assert cache_file(SMALL, tmp_path) == cache_file(dict(SMALL), tmp_path)
    assert cache_file(GENERATION_ARGS).parent == cache_dir()


def test_generation_leaves_the_global_random_generators_alone():
    np.random.seed(7)
    random.seed(7)
    expected = (np.random.rand(), random.random())
    np.random.seed(7)
    random.seed(7)
    m1d.generate(SMALL)  # reseeds both to 42 inside
    assert (np.random.rand(), random.random()) == expected


def test_cache_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ddgpipe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "ddgpipe"


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _flip_a_byte(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[len(data) // 3] ^= 0x10  # inside the x array: only the zip's CRC can tell
    return bytes(damaged)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda good: good[: len(good) // 2], "not an npz archive: truncated"),
        (lambda good: b"", "not an npz archive"),
        (lambda good: b"not a zip at all", "not an npz archive"),
        (_flip_a_byte, "CRC"),
        (lambda good: _npz(x=np.zeros(3)), "KeyError"),
        (lambda good: _npz(fingerprint=np.array("{}"), x=np.zeros(3), y=np.zeros(3),
                           x_test=np.zeros(3), y_test=np.zeros(3)),
         "other generation arguments"),
        (lambda good: _npz(fingerprint=np.array(m1d._fingerprint(SMALL)),
                           x=np.zeros((100, 39)), y=np.zeros(100, np.int64),
                           x_test=np.zeros((100, 40)), y_test=np.zeros(100, np.int64)),
         r"x is float64 \(100, 39\), expected finite float64 \(100, 40\)"),
        (lambda good: _npz(fingerprint=np.array(m1d._fingerprint(SMALL)),
                           x=np.zeros((100, 40)), y=np.full(100, 10),
                           x_test=np.zeros((100, 40)), y_test=np.zeros(100, np.int64)),
         "labels of x are not 100 integers in 0..9"),
    ],
)
def test_a_corrupt_cache_is_generated_again(tmp_path, capsys, damage, reason):
    fresh = mnist1d_arrays(SMALL, tmp_path)
    path = cache_file(SMALL, tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    capsys.readouterr()
    assert equal_arrays(mnist1d_arrays(SMALL, tmp_path), fresh)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"mnist1d cache {path} is unusable" in err
    assert "generating it again" in err and re.search(reason, err)
    assert equal_arrays(mnist1d_arrays(SMALL, tmp_path), fresh)  # mended: read quietly now
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def test_an_unwritable_cache_folder_still_gives_the_data(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    arrays = mnist1d_arrays(SMALL, tmp_path / "afile" / "cache")
    assert equal_arrays(arrays, m1d.generate(SMALL))
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot cache mnist1d" in err and CACHE_ENV in err


def test_a_generator_giving_other_arrays_is_a_usage_error(tmp_path, monkeypatch):
    wrong = {k: v.astype(np.float32) if k.startswith("x") else v
             for k, v in m1d.generate(SMALL).items()}
    monkeypatch.setattr(m1d, "generate", lambda args: wrong)
    with pytest.raises(UsageError, match="mnist1d generator returned unexpected arrays .*float32"):
        mnist1d_arrays(SMALL, tmp_path)
    assert not cache_file(SMALL, tmp_path).exists()


def test_small_set_is_normalised_on_its_training_split(small):
    assert small.input_shape == (1, 40)
    assert abs(float(small.train_x.mean())) < 1e-5
    assert abs(float(small.train_x.std(unbiased=False)) - 1) < 1e-4
    assert small.train_x.is_contiguous() and small.test_x.is_contiguous()


def test_image_sets_report_their_input_shape():
    assert load_dataset("digits").input_shape == (1, 8, 8)


# ---- ResNet1D on 1-D data, under backprop and DDG ----------------------------------------


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_ddg_trains_resnet1d_cut_into_k_stages(small, stages):
    torch.manual_seed(0)
    model = build_model("resnet1d-20", num_classes=10, input_shape=small.input_shape)
    before = [p.detach().clone() for p in model.parameters()]
    pipe = ddgpipe.DDG(model, stages=stages,
                       optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    losses = [pipe.step(small.train_x[i: i + 20], small.train_y[i: i + 20], F.cross_entropy)
              for i in range(0, 100, 20)]
    pipe.drain()
    assert len(pipe.stages) == stages and all(s.steps == 5 for s in pipe.stages)
    assert all(torch.isfinite(loss) for loss in losses if loss is not None)
    assert all(not torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
    pipe.eval()
    assert pipe.model(small.test_x[:8]).shape == (8, 10)


def test_the_training_loop_runs_resnet1d_with_ddg_on_mnist1d(small, tmp_path):
    config = TrainConfig(model="resnet1d-20", data="mnist1d", method="ddg", stages=4,
                         epochs=1, batch_size=20, lr=0.05, progress=False,
                         out=str(tmp_path / "run"))
    result = train(config, dataset=small)
    assert result.stages == 4 and 0 <= result.test_acc <= 1
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("model, data", [("resnet20", "mnist1d"), ("resnet1d-20", "digits")])
def test_a_model_of_the_other_dimensionality_fails_in_one_line(small, model, data):
    dataset = small if data == "mnist1d" else load_dataset("digits")
    config = TrainConfig(model=model, data=data, epochs=1, progress=False)
    with pytest.raises(UsageError, match=f"model {model} cannot take inputs of shape") as e:
        train(config, dataset=dataset)
    assert "\n" not in str(e.value)


def test_the_mlp_takes_signals(small):
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, input_shape=small.input_shape)
    assert isinstance(model[0][1], nn.Linear) and model[0][1].in_features == 40
    assert model.eval()(small.test_x[:4]).shape == (4, 10)
