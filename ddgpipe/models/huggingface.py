"""``--model hf:DIR``: a HuggingFace causal LM from a local folder holding its config.json,
with the saved weights when there are any, else freshly initialised from the global RNG."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ddgpipe.errors import UsageError
from ddgpipe.optional import require_transformers

__all__ = ["load_hf_model", "WEIGHT_FILES"]

# what save_pretrained writes for the weights (one file, or an index of shards)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def load_hf_model(folder: str) -> nn.Module:
    """The causal LM of ``folder`` in float32, its key/value cache off (training needs the
    logits alone); nothing is downloaded."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "holds no config.json"
        raise UsageError(f"--model hf:{folder} {what}; pass a folder written by "
                         "config.save_pretrained(DIR) or model.save_pretrained(DIR)")
    transformers = require_transformers(f"--model hf:{folder}")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        if any((path / name).is_file() for name in WEIGHT_FILES):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"cannot build a causal language model from {folder} ({first}); "
                         "pass the folder of a HuggingFace causal LM (GPT-2, Llama, Qwen2, ...)"
                         ) from None
    model.config.use_cache = False
    return model.float()
