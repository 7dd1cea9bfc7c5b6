"""HuggingFace conventions for tracing a causal LM: no key/value cache, and the logits as
the output. ``transformers`` is never imported here; a model is recognised by its config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ddgpipe.errors import UsageError

__all__ = ["export_kwargs", "chosen_outputs", "is_causal_lm", "example_token_ids",
           "CausalLMLogits"]

EXAMPLE_LENGTH = 8
"""Tokens per row of the example a causal LM is traced on (the trace keeps lengths free)."""


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` looks like a HuggingFace causal LM: a config with ``use_cache`` and
    ``vocab_size``, and output embeddings."""
    config = getattr(model, "config", None)
    return (hasattr(config, "use_cache") and isinstance(getattr(config, "vocab_size", None), int)
            and callable(getattr(model, "get_output_embeddings", None)))


def example_token_ids(model: nn.Module) -> Tensor | None:
    """Token ids to trace a HuggingFace causal LM on (two rows, drawn from a generator of
    its own: the caller's random state is untouched); None for any other model."""
    if not is_causal_lm(model):
        return None
    config: Any = model.config
    length = min(EXAMPLE_LENGTH, getattr(config, "max_position_embeddings", None)
                 or getattr(config, "n_positions", None) or EXAMPLE_LENGTH)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.randint(0, config.vocab_size, (2, length),
                        generator=torch.Generator().manual_seed(0))
    return ids.to(device)


class CausalLMLogits(nn.Module):
    """A HuggingFace causal LM called without its cache, returning the logits alone: what
    backprop runs, the same computation as the traced blocks (which hold the same
    parameters)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Tensor) -> Tensor:
        return self.model(*args, use_cache=False).logits


def export_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments for tracing: a HuggingFace model (one with a ``config`` that has
    ``use_cache``) is traced without its cache, so its output is the logits alone."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if hasattr(config, "use_cache") else {}


def chosen_outputs(structure: Any, model: nn.Module) -> list[int] | None:
    """Which of the model's flattened outputs the last block returns, given the output's
    structure with each leaf replaced by its index: all of a tensor or a tuple of tensors
    (None), or the ``logits`` of a mapping (a HuggingFace ``ModelOutput``)."""
    if isinstance(structure, int):
        return None
    if isinstance(structure, (tuple, list)) and all(isinstance(s, int) for s in structure):
        return None
    if isinstance(structure, Mapping) and isinstance(structure.get("logits"), int):
        return [structure["logits"]]
    raise UsageError(f"{type(model).__name__} returns a {type(structure).__name__}; the last "
                     "block must return a tensor or a tuple of tensors: give a model whose "
                     "forward returns them (or a mapping with 'logits', as HuggingFace's do)")
