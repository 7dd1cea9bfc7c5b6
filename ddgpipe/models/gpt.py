"""A decoder-only transformer (GPT) as a flat ``nn.Sequential`` DDG can cut between any blocks.

``[embedding, block_1, ..., block_L, head]``: learned token and position embeddings with
dropout; pre-LayerNorm blocks of causal self-attention (``F.scaled_dot_product_attention``
with ``is_causal=True``) and a GELU MLP, each added to the residual stream after dropout; a
final LayerNorm and the projection to the vocabulary. GPT-2's initialisation: N(0, 0.02) for
every weight, the residual projections scaled by 1/sqrt(2L), zero biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddgpipe.errors import UsageError
from ddgpipe.losses import logits_of

__all__ = ["GPTConfig", "gpt", "generate", "parameter_count", "Embedding", "Block",
           "Head"]


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT. ``tie_embeddings`` shares the token embedding with the output
    projection (one tensor in the first and the last block)."""

    layers: int = 8
    width: int = 256
    heads: int = 4
    context: int = 128
    vocab: int = 256
    dropout: float = 0.1
    tie_embeddings: bool = False

    def check(self) -> GPTConfig:
        for name in ("layers", "width", "heads", "context", "vocab"):
            if getattr(self, name) < 1:
                raise UsageError(f"a GPT's {name} must be >= 1 (got {getattr(self, name)}); "
                                 f"pass --{name} 1 or more")
        if self.width % self.heads:
            raise UsageError(f"the width {self.width} does not split into {self.heads} heads; "
                             f"pass a width that is a multiple of the heads (--width, --heads)")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"dropout must be in [0, 1) (got {self.dropout})")
        return self


class Embedding(nn.Module):
    """Token ids ``[B, T]`` -> hidden states ``[B, T, W]``: token + position, then dropout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.context = config.context
        self.tokens = nn.Embedding(config.vocab, config.width)
        self.positions = nn.Embedding(config.context, config.width)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[-1]
        if length > self.context:
            raise UsageError(f"a sequence of {length} tokens is longer than the model's "
                             f"{self.context} positions; build it with context >= {length} "
                             "(--context) or feed shorter windows")
        vocab = self.tokens.num_embeddings
        # on a GPU the check would wait for the device; compiled, it would break the graph
        if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling() \
                and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
            raise UsageError(f"token ids {int(ids.min())}..{int(ids.max())} fall outside the "
                             f"model's vocabulary of {vocab}; build it with num_classes (the "
                             "vocabulary) covering every id, or fix the tokenizer")
        positions = torch.arange(length, device=ids.device)
        return self.drop(self.tokens(ids) + self.positions(positions))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        q, k, v = (part.view(b, t, self.heads, w // self.heads).transpose(1, 2)
                   for part in self.qkv(x).split(w, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, t, w)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.width, 4 * config.width)
        self.proj = nn.Linear(4 * config.width, config.width)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.width)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.width)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and the projection to logits ``[B, T, V]`` (no bias, as GPT-2)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln = nn.LayerNorm(config.width)
        self.proj = nn.Linear(config.width, config.vocab, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.ln(x))


def gpt(config: GPTConfig) -> nn.Sequential:
    """A fresh GPT (weights from the global torch generator) as a flat ``nn.Sequential``."""
    config.check()
    embedding, head = Embedding(config), Head(config)
    model = nn.Sequential(embedding, *[Block(config) for _ in range(config.layers)], head)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif ".ln" in name:
            nn.init.ones_(p)
        else:  # GPT-2: the projections into the residual stream shrink with depth
            residual = name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight")
            std = 0.02 / math.sqrt(2 * config.layers) if residual else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
    if config.tie_embeddings:
        head.proj.weight = embedding.tokens.weight
    return model


def parameter_count(config: GPTConfig) -> int:
    """The closed form: embeddings V W + C W, each block 12 W^2 + 13 W (attention 4 W^2 + 4 W,
    MLP 8 W^2 + 5 W, two LayerNorms 4 W), the head's LayerNorm 2 W and projection V W (none
    when tied)."""
    v, c, w, n = config.vocab, config.context, config.width, config.layers
    head = 0 if config.tie_embeddings else v * w
    return v * w + c * w + n * (12 * w * w + 13 * w) + 2 * w + head


@torch.no_grad()
def generate(model: nn.Module, ids: Tensor, new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             context: int | None = None, vocab: int | None = None) -> Tensor:
    """``ids`` ``[B, T]`` followed by ``new_tokens`` tokens sampled one at a time, as nanoGPT
    does: the model sees the last ``context`` tokens (a ddgpipe GPT's own, unless given), its
    logits (a HuggingFace output's ``logits``) are divided by ``temperature`` and cut to the
    ``top_k`` likeliest, and to the first ``vocab`` ids when given (a model may have more
    outputs than its tokenizer has tokens). Put the model in ``eval()`` first (dropout off);
    the same ``generator`` state gives the same tokens."""
    if new_tokens < 0:
        raise UsageError(f"the number of tokens to generate must be >= 0 (got {new_tokens})")
    if not temperature > 0:
        raise UsageError(f"the temperature must be > 0 (got {temperature}); a small one such "
                         "as 0.01 samples almost greedily")
    if top_k is not None and top_k < 1:
        raise UsageError(f"top-k must be >= 1 (got {top_k}), or None to keep every token")
    if ids.dim() != 2 or ids.shape[1] < 1:
        raise UsageError(f"generate takes token ids of shape [batch, length >= 1], got "
                         f"{tuple(ids.shape)}")
    if context is None:
        context = next((m.context for m in model.modules() if isinstance(m, Embedding)), None)
    if context is None:
        raise UsageError("generate takes a GPT built by ddgpipe (gpt() or build_model('gpt-L')), "
                         "or any model with its context= given: the model has no token "
                         "Embedding block")
    for _ in range(new_tokens):
        logits = logits_of(model(ids[:, -context:]))[:, -1, :vocab].float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids
