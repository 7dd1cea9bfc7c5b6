"""A user's own model and data through `ddgpipe train` and `train()`: a factory file, a
package module, text:PATH and tensors:PATH (.pt and .npz); resume re-calls the factory; every
bad input ends in one line with exit code 2."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddgpipe.cli import main
from ddgpipe.data.user import load_text_file
from ddgpipe.errors import UsageError
from ddgpipe.training import TrainConfig, train

FAST = ["--no-progress", "--threads", "1"]

FACTORIES = '''
from torch import nn

def classifier(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))

def bigram(num_classes, input_shape):
    assert input_shape == (16,)
    return nn.Sequential(nn.Embedding(num_classes, 8), nn.ReLU(), nn.Linear(8, num_classes))

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.out(x + self.inner(x))

def too_few_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 4))

def small_vocabulary():
    return nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 256))

def wrong_shape():
    return nn.Sequential(nn.Linear(3, 10))

def raises():
    raise ValueError("no such width")

def not_a_module():
    return 42

NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A factory file, a text file and the digits as .pt and .npz, in one folder."""
    root = tmp_path_factory.mktemp("user")
    (root / "nets.py").write_text(FACTORIES)
    words = "the quick brown fox jumps over a lazy dog and runs away".split()
    rng = random.Random(0)
    (root / "words.txt").write_text(" ".join(rng.choice(words) for _ in range(800)))
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:400], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target[:400])
    arrays = {"train_x": x[:300], "train_y": y[:300], "test_x": x[300:], "test_y": y[300:]}
    torch.save(arrays, root / "digits.pt")
    np.savez(root / "digits.npz", **{k: v.numpy() for k, v in arrays.items()})
    return root


def run(tmp_path: Path, name: str, *flags: str) -> Path:
    assert main(["train", *flags, *FAST, "--out", str(tmp_path / name)]) == 0
    return tmp_path / name


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def numbers(run_dir: Path) -> list[dict]:
    timing = ("wall_time", "samples_per_s", "tokens_per_s", "images_per_s")
    return [{k: v for k, v in r.items() if k not in timing}
            for kind in ("eval", "epoch") for r in records(run_dir, kind)]


@pytest.mark.slow
def test_a_factory_file_trains_with_bp_and_ddg(tmp_path, files, capsys):
    model = f"{files / 'nets.py'}:classifier"
    digits = ["--model", model, "--epochs", "1", "--batch-size", "32"]
    bp = run(tmp_path, "bp", *digits)
    ddg = run(tmp_path, "ddg", *digits, "--method", "ddg", "--stages", "2", "--split", "2")
    for r in (bp, ddg):
        epoch = records(r, "epoch")[-1]
        assert epoch["test_acc"] > 0.5, epoch  # digits: 10 classes, chance is 0.1
        assert (r / "model.safetensors").exists()
    saved = json.loads((ddg / "config.json").read_text())
    assert saved["model"] == model and saved["split"] == [2]
    assert numbers(bp) != numbers(ddg)  # stage 0 learns from a delayed gradient
    assert "test acc" in capsys.readouterr().out


def test_the_same_seed_builds_the_same_model(tmp_path, files):
    model = f"{files / 'nets.py'}:classifier"
    first = run(tmp_path, "a", "--model", model, "--iterations", "3", "--seed", "5")
    second = run(tmp_path, "b", "--model", model, "--iterations", "3", "--seed", "5")
    assert numbers(first) == numbers(second)


def test_a_module_that_is_not_sequential_trains_at_k1(tmp_path, files):
    out = run(tmp_path, "res", "--model", f"{files / 'nets.py'}:Residual", "--iterations", "4")
    assert json.loads((out / "config.json").read_text())["num_blocks"] is None
    assert records(out, "epoch")[-1]["iteration"] == 4


def test_a_package_module_factory(tmp_path, files, monkeypatch):
    monkeypatch.syspath_prepend(str(files))
    out = run(tmp_path, "pkg", "--model", "nets:classifier", "--iterations", "3")
    assert json.loads((out / "config.json").read_text())["model"] == "nets:classifier"
    sys.modules.pop("nets", None)


def test_text_file_trains_a_language_model_and_resumes(tmp_path, files):
    lm = ["--model", f"{files / 'nets.py'}:bigram", "--data", f"text:{files / 'words.txt'}",
          "--context", "16", "--batch-size", "4", "--iterations", "8", "--eval-every", "4"]
    whole = run(tmp_path, "whole", *lm)
    evals = records(whole, "eval")
    assert [r["iteration"] for r in evals] == [4, 8] and "val_bits_per_byte" in evals[0]
    info = json.loads((whole / "config.json").read_text())["data_info"]
    assert info["tokens"] == len((files / "words.txt").read_bytes())
    half = run(tmp_path, "half", *lm, "--stop-after", "3")
    assert main(["train", *lm, *FAST, "--resume", str(half), "--stop-after", "4"]) == 0
    assert main(["train", *lm, *FAST, "--resume", str(half)]) == 0  # the factory is re-called
    assert numbers(half) == numbers(whole)


def test_text_file_holds_out_blocks(files):
    data = load_text_file(files / "words.txt", context=16)
    assert data.tokens and data.num_classes == 256 and data.input_shape == (16,)
    assert len(data.test_x) > 0 and len(data.train_x) > 10 * len(data.test_x)
    assert torch.equal(data.train_y[:, :-1], data.train_x[:, 1:])  # the next byte


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_tensors_file_trains_a_classifier(tmp_path, files, suffix):
    out = run(tmp_path, f"t{suffix[1:]}", "--model", f"{files / 'nets.py'}:classifier",
              "--data", f"tensors:{files / ('digits' + suffix)}", "--epochs", "2")
    assert json.loads((out / "config.json").read_text())["data_info"]["num_classes"] == 10
    assert records(out, "epoch")[-1]["test_acc"] > 0.3


def test_pt_and_npz_give_the_same_numbers(tmp_path, files):
    runs = [run(tmp_path, s, "--model", "mlp", "--data", f"tensors:{files / ('digits.' + s)}",
                "--iterations", "3") for s in ("pt", "npz")]
    assert numbers(runs[0]) == numbers(runs[1])


def test_train_takes_a_model_object_and_a_factory(tmp_path, files):
    from torch import nn

    def factory():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    config = TrainConfig.from_flat(epochs=1, iterations=3, out=str(tmp_path / "f"),
                                   progress=False, threads=1)
    first = train(config, model=factory)
    assert first is not None and first.test_loss == first.test_loss  # a number, not NaN
    saved = json.loads((tmp_path / "f" / "config.json").read_text())
    assert saved["model"] == "object:factory"
    torch.manual_seed(0)
    again = TrainConfig.from_flat(epochs=1, iterations=3, out=str(tmp_path / "m"),
                                  progress=False, threads=1)
    second = train(again, model=factory())  # a module as it is: seeded the same here
    assert second is not None and second.test_loss == first.test_loss
    config_strings = TrainConfig.from_flat(
        model=f"{files / 'nets.py'}:classifier", data=f"tensors:{files / 'digits.pt'}",
        iterations=2, out=str(tmp_path / "s"), progress=False, threads=1)
    assert train(config_strings) is not None


def bad(tmp_path: Path, capsys, *flags: str) -> str:
    capsys.readouterr()
    assert main(["train", *flags, *FAST, "--iterations", "2",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("factory, says", [
    ("missing", "defines no 'missing'"),
    ("NOT_CALLABLE", "NOT_CALLABLE is a int, not callable"),
    ("raises", "raised ValueError: no such width; fix the factory"),
    ("not_a_module", "returned a int, not a torch.nn.Module"),
    ("wrong_shape", "cannot take digits inputs of shape (1, 8, 8)"),
    ("too_few_classes", "has labels up to 9 but model"),
])
def test_a_bad_factory_is_one_line(tmp_path, files, capsys, factory, says):
    assert says in bad(tmp_path, capsys, "--model", f"{files / 'nets.py'}:{factory}")


def test_bad_model_and_data_files_are_one_line(tmp_path, files, capsys):
    text = ["--data", f"text:{files / 'words.txt'}", "--context", "16"]
    cases = [
        (["--model", str(tmp_path / "none.py") + ":f"], "no such file"),
        (["--model", "no_such_package_xyz:f"], "cannot import no_such_package_xyz"),
        (["--model", f"{files / 'nets.py'}:classifier", "--data", f"tensors:{tmp_path}/x.pt"],
         "does not exist"),
        (["--model", f"{files / 'nets.py'}:small_vocabulary", *text],
         f"token ids up to {ord('z')} but model"),  # 'lazy'
        (["--model", "hf:" + str(tmp_path), *text], "holds no config.json"),
        (["--model", f"{files / 'nets.py'}:bigram", "--data", "text:" + str(files / "e.txt")],
         "is empty"),
        (["--model", f"{files / 'nets.py'}:bigram", *text[:2], "--context", "4000"],
         "fewer than two windows of --context 4000"),
        (["--model", f"{files / 'nets.py'}:classifier", "--tokenizer", str(tmp_path)],
         "--tokenizer turns a text file into tokens"),
    ]
    (files / "e.txt").write_bytes(b"")
    for flags, says in cases:
        assert says in bad(tmp_path, capsys, *flags), flags


def test_bad_tensor_files_are_one_line(tmp_path, files, capsys):
    x = np.zeros((4, 1, 8, 8), np.float32)
    np.savez(tmp_path / "keys.npz", train_x=x, test_x=x)
    np.savez(tmp_path / "neg.npz", train_x=x, train_y=np.array([0, 1, -1, 2]), test_x=x,
             test_y=np.zeros(4, np.int64))
    np.savez(tmp_path / "float.npz", train_x=x, train_y=np.zeros(4), test_x=x,
             test_y=np.zeros(4, np.int64))
    np.savez(tmp_path / "range.npz", train_x=x, train_y=np.array([0, 1, 2, 12]), test_x=x,
             test_y=np.zeros(4, np.int64), num_classes=np.array(10))
    np.savez(tmp_path / "wide.npz", train_x=x, train_y=np.array([0, 1, 2, 12]), test_x=x,
             test_y=np.zeros(4, np.int64))
    model = ["--model", f"{files / 'nets.py'}:classifier"]
    cases = [("keys", "lacks train_y, test_y"), ("neg", "holds the label -1"),
             ("float", "labels are class indices: save them as integers"),
             ("range", "labels reach 12 but num_classes is 10"),
             ("wide", "has labels up to 12 but model")]
    for name, says in cases:
        flags = [*model, "--data", f"tensors:{tmp_path / name}.npz"]
        if name == "wide":
            flags = ["--model", f"{files / 'nets.py'}:too_few_classes", *flags[2:]]
        assert says in bad(tmp_path, capsys, *flags), name


def test_transformers_missing_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "t.txt").write_text("hello world " * 50)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    line = bad(tmp_path, capsys, "--model", f"hf:{tmp_path / 'hf'}", "--data",
               f"text:{tmp_path / 't.txt'}", "--context", "8")
    assert "pip install 'ddgpipe[hf]'" in line


def test_user_data_errors_in_python_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="is empty"):
        (tmp_path / "e.txt").write_text("")
        load_text_file(tmp_path / "e.txt", context=8)


def test_the_bench_builds_a_factory_for_its_images(files):
    from ddgpipe.bench import BenchConfig
    from ddgpipe.bench.workload import bench_batch, bench_model

    config = BenchConfig(model=f"{files / 'nets.py'}:classifier", in_channels=1, image_size=8,
                         batch_size=4)
    model = bench_model(config)
    x, y = bench_batch(config)
    assert model(x).shape == (4, 10) and len(model) == 4
    with pytest.raises(UsageError, match="returned a Residual; return the layers as an"):
        bench_model(BenchConfig(model=f"{files / 'nets.py'}:Residual", in_channels=1,
                                image_size=8))
