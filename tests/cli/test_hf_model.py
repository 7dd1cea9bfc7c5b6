"""`ddgpipe train --model hf:DIR --data text:PATH`: HuggingFace causal LMs built from a saved
config (random init) or saved weights, trained from the command line, sampled, and refused in
one line where the model and the data do not fit."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from ddgpipe.cli import main
from ddgpipe.models.huggingface import load_hf_model

transformers = pytest.importorskip("transformers")

FAST = ["--no-progress", "--threads", "1", "--context", "16", "--batch-size", "4",
        "--iterations", "4", "--eval-every", "2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A text file and two tiny configs: GPT-2 (bytes) and Llama with tied embeddings."""
    root = tmp_path_factory.mktemp("hf")
    words = "the quick brown fox jumps over a lazy dog and runs away".split()
    rng = random.Random(0)
    (root / "words.txt").write_text(" ".join(rng.choice(words) for _ in range(600)))
    transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                            bos_token_id=0, eos_token_id=0).save_pretrained(root / "gpt2")
    transformers.LlamaConfig(vocab_size=260, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=32, tie_word_embeddings=True,
                             bos_token_id=0, eos_token_id=0).save_pretrained(root / "llama")
    transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                            bos_token_id=0, eos_token_id=0).save_pretrained(root / "small")
    return root


def train(tmp_path: Path, name: str, model: str, folder: Path, *flags: str) -> Path:
    out = tmp_path / name
    assert main(["train", "--model", f"hf:{folder / model}", "--data",
                 f"text:{folder / 'words.txt'}", *FAST, *flags, "--out", str(out)]) == 0
    return out


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_a_config_folder_trains_at_k1(tmp_path, folder, model):
    out = train(tmp_path, model, model, folder)
    evals = records(out, "eval")
    assert [r["iteration"] for r in evals] == [2, 4]
    assert all(r["val_loss"] == r["val_loss"] for r in evals)  # numbers, not NaN
    state = torch.load(out / "model.pt", weights_only=True)
    fresh = load_hf_model(str(folder / model))
    assert set(state) == set(fresh.state_dict())  # the HuggingFace names, loadable back
    fresh.load_state_dict(state)
    saved = json.loads((out / "config.json").read_text())
    assert saved["parameters"] == sum(p.numel() for p in fresh.parameters())


def test_saved_weights_are_loaded(tmp_path, folder):
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(folder / "gpt2"))
    model.save_pretrained(tmp_path / "weights")
    loaded = load_hf_model(str(tmp_path / "weights"))
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert loaded.config.use_cache is False


def test_a_run_can_be_sampled(tmp_path, folder, capsys):
    out = train(tmp_path, "s", "gpt2", folder)
    capsys.readouterr()
    assert main(["sample", str(out), "--prompt", "the ", "--tokens", "12", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("the ")
    assert main(["sample", str(out), "--prompt", "the ", "--tokens", "12", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first


def test_a_local_tokenizer_replaces_bytes(tmp_path, folder, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    words = sorted(set((folder / "words.txt").read_text().split()))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "tok")
    out = train(tmp_path, "run", "gpt2", folder, "--tokenizer", str(tmp_path / "tok"),
                "--context", "8")
    info = json.loads((out / "config.json").read_text())["data_info"]
    assert info["vocabulary"] == len(vocab) and info["tokens"] == 600
    capsys.readouterr()
    assert main(["sample", str(out), "--prompt", "the lazy", "--tokens", "5"]) == 0
    words = capsys.readouterr().out.split()  # the tokenizer's words, decoded back
    assert words[:2] == ["the", "lazy"] and len(words) == 7 and set(words) <= set(vocab)


def test_two_stages_save_the_models_own_names_on_every_executor(tmp_path, folder):
    """K = 2 with a tied embedding and microbatches, in one process and in two: the same
    numbers, and model.pt holds the HuggingFace names (a traced block names its tensors
    otherwise), loadable back into the model."""
    flags = ["--method", "ddg", "--stages", "2", "--split", "2", "--microbatches", "2"]
    saved = {}
    for executor in ("reference", "processes"):
        out = train(tmp_path, executor, "llama", folder, *flags, "--executor", executor)
        assert [r["iteration"] for r in records(out, "eval")] == [2, 4]
        saved[executor] = torch.load(out / "model.pt", weights_only=True)
    fresh = load_hf_model(str(folder / "llama"))
    assert list(saved["processes"]) == list(saved["reference"]) == list(fresh.state_dict())
    for name, value in saved["reference"].items():
        assert torch.equal(saved["processes"][name], value), name
    assert torch.equal(saved["processes"]["lm_head.weight"],
                       saved["processes"]["model.embed_tokens.weight"])
    fresh.load_state_dict(saved["processes"])


@pytest.mark.parametrize("flags, says", [
    (["--model", "hf:{root}/small"], "has token ids up to"),
    (["--model", "hf:{root}/gpt2", "--context", "64"], "cannot take text:"),
    (["--model", "hf:{root}/nowhere"], "hf:{root}/nowhere does not exist"),
    (["--model", "hf:{root}/gpt2", "--data", "digits"], "is a causal language model"),
])
def test_what_does_not_fit_is_one_line(tmp_path, folder, capsys, flags, says):
    flags = [f.format(root=folder) for f in flags]
    data = [] if "--data" in flags else ["--data", f"text:{folder / 'words.txt'}"]
    code = main(["train", *data, *FAST, *flags, "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says.format(root=folder) in err[0], err
