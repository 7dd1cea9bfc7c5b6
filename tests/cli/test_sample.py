"""`ddgpipe sample`: a trained gpt-L run writes text, the same for the same seed, with one-line
errors for what cannot be sampled; generation crops a long context as nanoGPT does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddgpipe.cli import main
from ddgpipe.errors import UsageError
from ddgpipe.models import GPTConfig, generate, gpt

TINY = ["train", "--model", "gpt-2", "--width", "32", "--heads", "2", "--context", "16",
        "--batch-size", "4", "--iterations", "6", "--no-progress", "--threads", "1",
        "--tie-embeddings"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sample") / "lm"
    assert main([*TINY, "--out", str(run)]) == 0
    return run


def sample(capsys, run: Path, *flags: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["sample", str(run), *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_same_seed_writes_the_same_text(lm_run, capsys):
    flags = ["--prompt", "ROMEO:", "--tokens", "60", "--top-k", "50", "--temperature", "1.0"]
    code, first, _ = sample(capsys, lm_run, *flags, "--seed", "3")
    assert code == 0 and first.startswith("ROMEO:")
    assert sample(capsys, lm_run, *flags, "--seed", "3")[1] == first
    assert sample(capsys, lm_run, *flags, "--seed", "4")[1] != first


def test_a_prompt_longer_than_the_context_is_cropped(lm_run, capsys):
    prompt = "To be, or not to be, that is the question: " * 2  # 88 bytes, context 16
    code, out, _ = sample(capsys, lm_run, "--prompt", prompt, "--tokens", "20")
    assert code == 0 and out.startswith(prompt)


@pytest.mark.parametrize("flags, expected", [
    (["--prompt", ""], "--prompt is empty"),
    (["--tokens", "0"], "--tokens must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "nan"], "--temperature must be > 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
], ids=["empty-prompt", "no-tokens", "zero-temperature", "nan-temperature", "zero-top-k"])
def test_bad_numbers_are_one_line(lm_run, capsys, flags, expected):
    code, _, err = sample(capsys, lm_run, *flags)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and expected in err


def test_a_run_that_cannot_be_sampled_is_one_line(tmp_path, lm_run, capsys):
    mlp = tmp_path / "mlp"
    assert main(["train", "--model", "mlp", "--data", "digits", "--iterations", "2",
                 "--no-progress", "--threads", "1", "--out", str(mlp)]) == 0
    code, _, err = sample(capsys, mlp)
    assert code == 2 and "is a mlp run, not a language model" in err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_bytes((lm_run / "config.json").read_bytes())
    code, _, err = sample(capsys, unfinished)
    assert code == 2 and "has no model.pt" in err
    code, _, err = sample(capsys, tmp_path / "nowhere")
    assert code == 2 and "has no readable config.json" in err


def test_generation_sees_only_the_last_context_tokens():
    torch.manual_seed(0)
    model = gpt(GPTConfig(layers=1, width=16, heads=2, context=8, dropout=0.0)).eval()
    long = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(1))

    def continued(ids):
        return generate(model, ids, 12, temperature=0.9, top_k=40,
                        generator=torch.Generator().manual_seed(2))[:, ids.shape[1]:]

    assert torch.equal(continued(long), continued(long[:, -8:]))
    with pytest.raises(UsageError, match="temperature must be > 0"):
        generate(model, long, 1, temperature=0.0)
