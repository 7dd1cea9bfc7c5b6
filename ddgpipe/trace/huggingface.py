"""HuggingFace conventions for tracing a causal LM: no key/value cache, and the logits as
the output. ``transformers`` is never imported here; a model is recognised by its config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ddgpipe.errors import UsageError

__all__ = ["export_kwargs", "chosen_outputs"]


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
