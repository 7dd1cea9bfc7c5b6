"""Models nobody here wrote: a HuggingFace GPT-2 built from a config (random init, dropout on,
nothing downloaded) and torch.nn.TransformerEncoderLayer blocks, run through DDG as users
would wrap them. K = 1 is backprop bitwise, the threads are the reference bitwise, K = 4
trains, and GPT-2's tied embeddings are a tie across stages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ddgpipe
from ddgpipe.losses import token_cross_entropy

transformers = pytest.importorskip("transformers")

VOCAB, T = 64, 16


class Embeddings(nn.Module):
    """GPT-2's token and position embeddings and their dropout: token ids in, hidden out."""

    def __init__(self, gpt):
        super().__init__()
        self.wte, self.wpe, self.drop = gpt.wte, gpt.wpe, gpt.drop

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.wte(ids) + self.wpe(positions))


class Head(nn.Module):
    def __init__(self, norm, projection):
        super().__init__()
        self.norm, self.projection = norm, projection

    def forward(self, h):
        return self.projection(self.norm(h))


def gpt2(layers=4, tied=False, seed=0):
    """A HuggingFace GPT-2 as a flat nn.Sequential: embeddings, its blocks, the LM head."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=32, n_layer=layers,
                                     n_head=4, tie_word_embeddings=tied, bos_token_id=0,
                                     eos_token_id=0)
    lm = transformers.GPT2LMHeadModel(config)
    lm.train()  # dropout on: 0.1 on embeddings, attention and residuals
    gpt = lm.transformer
    return nn.Sequential(Embeddings(gpt), *gpt.h, Head(gpt.ln_f, lm.lm_head))


def encoder(layers=4, seed=0):
    torch.manual_seed(seed)
    blocks = [nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
              for _ in range(layers)]
    return nn.Sequential(nn.Embedding(VOCAB, 32), *blocks, nn.Linear(32, VOCAB))


def adamw(ps):
    return torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1)


def token_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (4, T + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def losses_and_state(pipe, data):
    losses = [pipe.step(x, y, token_cross_entropy).item() for x, y in data]
    pipe.drain()
    return losses, {k: v.clone() for k, v in pipe.model.state_dict().items()}


def assert_same(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


@pytest.mark.parametrize("make", [gpt2, encoder])
def test_one_stage_is_backprop_bitwise(make):
    data = token_batches(4)
    bp = ddgpipe.Backprop(make(), adamw)
    expected = losses_and_state(bp, data)
    assert_same(losses_and_state(ddgpipe.DDG(make(), 1, adamw), data), expected)


@pytest.mark.parametrize("make,stages", [(gpt2, 2), (gpt2, 4), (encoder, 2)])
def test_threads_are_the_reference_bitwise_with_dropout(make, stages):
    data = token_batches(6)
    torch.set_num_threads(1)
    ref = losses_and_state(ddgpipe.DDG(make(), stages, adamw, executor="reference"), data)
    with ddgpipe.DDG(make(), stages, adamw, executor="threads", threads=1) as pipe:
        assert_same(losses_and_state(pipe, data), ref)


def test_four_stages_of_gpt2_learn_a_pattern():
    """A repeating sequence is learnt: the loss falls below half its start (log 64 = 4.16)."""
    pattern = torch.arange(T + 1) * 5 % VOCAB
    ids = pattern.repeat(8, 1)
    pipe = ddgpipe.DDG(gpt2(), 4, adamw, executor="threads", threads=1)
    losses = [pipe.step(ids[:, :-1], ids[:, 1:], token_cross_entropy).item()
              for _ in range(40)]
    pipe.drain()
    assert losses[0] > 4.0 and max(losses[-5:]) < 2.0, losses


def test_tied_embeddings_across_stages_stay_equal_and_threads_are_the_reference(one_thread):
    """GPT-2's token embedding (stage 0) and LM head (stage 1) are one tie: each stage holds
    a copy, both step with the sum of the two uses' gradients every clock."""
    data = token_batches(6)
    pipe = ddgpipe.DDG(gpt2(tied=True), 2, adamw, split=[3], executor="reference")
    ref = losses_and_state(pipe, data)
    assert torch.equal(pipe.model[0].wte.weight, pipe.model[5].projection.weight)
    with ddgpipe.DDG(gpt2(tied=True), 2, adamw, split=[3], executor="threads",
                     threads=1) as threads:
        assert_same(losses_and_state(threads, data), ref)


@pytest.mark.slow
def test_the_example_trains_a_huggingface_gpt2_offline(tmp_path):
    """examples/hf_gpt2.py as a user runs it, for a few steps (no network): the model it
    built, traced and trained, saved with save_pretrained."""
    script = Path(__file__).parents[2] / "examples" / "hf_gpt2.py"
    proc = subprocess.run([sys.executable, str(script), "--steps", "3", "--layers", "2",
                           "--width", "32", "--context", "32", "--stages", "2",
                           "--save", str(tmp_path / "saved")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "traced into 4 blocks, cut at" in proc.stdout and "held-out loss" in proc.stdout
    assert (tmp_path / "saved" / "config.json").exists()
