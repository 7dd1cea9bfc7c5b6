"""A user's own data: ``text:PATH`` (any file as tokens, bytes or a local HuggingFace
tokenizer's) and ``tensors:PATH`` (a ``.pt`` dict of tensors or a ``.npz``, classification).

Text is cut into held-out blocks as the Shakespeare corpus is (``text.py``); a small file gets
smaller blocks (20 at least) so that one of them can be held out.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ddgpipe.data.dataset import Dataset
from ddgpipe.data.text import BLOCK, token_dataset
from ddgpipe.errors import UsageError
from ddgpipe.optional import require_transformers

__all__ = ["USER_DATA_PREFIXES", "is_user_data", "is_text_data", "load_user_data",
           "load_text_file", "load_tensors", "TENSOR_KEYS"]

USER_DATA_PREFIXES = ("text:", "tensors:")
TENSOR_KEYS = ("train_x", "train_y", "test_x", "test_y")
"""The arrays a ``tensors:PATH`` file holds; an optional ``num_classes`` may follow."""
MIN_BLOCKS = 20  # a small text file is cut into this many blocks, one of them held out


def is_user_data(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(USER_DATA_PREFIXES)


def is_text_data(spec: str | None) -> bool:
    """Whether ``spec`` names a user's text file (token windows, for a language model)."""
    return bool(spec) and str(spec).startswith("text:")


def load_user_data(spec: str, context: int = 128, tokenizer: str | None = None) -> Dataset:
    """The data set ``spec`` names: ``text:PATH`` or ``tensors:PATH``."""
    kind, _, path = spec.partition(":")
    if not path:
        raise UsageError(f"--data {spec} names no file; pass --data {kind}:PATH")
    if kind == "text":
        return load_text_file(Path(path), context, tokenizer)
    if tokenizer is not None:
        raise UsageError(f"--tokenizer turns text into tokens; --data {spec} holds tensors: "
                         "drop --tokenizer, or use --data text:PATH")
    return load_tensors(Path(path))


def _existing(path: Path, flag: str) -> Path:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UsageError(f"{flag} {path} {what}; pass the path of a readable file")
    return path


def load_text_file(path: Path, context: int, tokenizer: str | None = None) -> Dataset:
    """Any file as windows of ``context`` tokens: its bytes (vocabulary 256), or the ids of a
    local HuggingFace ``tokenizer`` folder (vocabulary ``len(tokenizer)``)."""
    raw = _existing(path, "--data text:").read_bytes()
    if not raw:
        raise UsageError(f"--data text:{path} is empty; give a file with text in it")
    if tokenizer is None:
        tokens, vocab = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long(), 256
    else:
        tokens, vocab = _tokenize(raw, tokenizer, path)
    if len(tokens) < 2 * (context + 1):
        raise UsageError(f"--data text:{path} holds {len(tokens)} tokens, fewer than two windows "
                         f"of --context {context} and their targets (one to train on, one held "
                         "out); give a longer file or a smaller --context")
    block = min(BLOCK, max(context + 1, math.ceil(len(tokens) / MIN_BLOCKS)))
    info = {"file": str(path), "bytes": len(raw), "tokens": len(tokens),
            "sha256": hashlib.sha256(raw).hexdigest(), "tokenizer": tokenizer, "vocabulary": vocab}
    return token_dataset(f"text:{path}", tokens, context, vocab, info, block=block)


def _tokenize(raw: bytes, folder: str, path: Path) -> tuple[Tensor, int]:
    """The text's token ids by the tokenizer saved in ``folder``, and its vocabulary size."""
    tok = load_tokenizer(folder)
    text = raw.decode("utf-8", errors="replace")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long), len(tok)


def load_tokenizer(folder: str):
    """The HuggingFace tokenizer saved in the local ``folder`` (nothing is downloaded)."""
    transformers = require_transformers(f"--tokenizer {folder}")
    if not (Path(folder) / "tokenizer_config.json").is_file() and \
            not (Path(folder) / "tokenizer.json").is_file():
        raise UsageError(f"--tokenizer {folder} holds no tokenizer.json or tokenizer_config.json; "
                         "pass a folder written by tokenizer.save_pretrained(DIR)")
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"cannot load the tokenizer in {folder} ({first}); pass a folder "
                         "written by tokenizer.save_pretrained(DIR)") from None


def load_tensors(path: Path) -> Dataset:
    """A classification set from a ``.pt`` (a dict of tensors, read with weights_only) or a
    ``.npz``: ``train_x``, ``train_y``, ``test_x``, ``test_y``, optionally ``num_classes``."""
    arrays = _read_arrays(_existing(path, "--data tensors:"))
    missing = [k for k in TENSOR_KEYS if k not in arrays]
    if missing:
        raise UsageError(f"--data tensors:{path} lacks {', '.join(missing)} (it holds "
                         f"{', '.join(sorted(arrays)) or 'nothing'}); save train_x, train_y, "
                         "test_x, test_y (and optionally num_classes) in it")
    x_train, x_test = (_inputs(arrays[k], k, path) for k in ("train_x", "test_x"))
    y_train, y_test = (_labels(arrays[k], k, path) for k in ("train_y", "test_y"))
    for x, y, part in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if len(x) != len(y) or len(x) == 0:
            raise UsageError(f"--data tensors:{path}: {part}_x has {len(x)} samples and "
                             f"{part}_y {len(y)} labels; give one label per sample, at least one")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UsageError(f"--data tensors:{path}: train_x samples are {tuple(x_train.shape[1:])} "
                         f"but test_x samples {tuple(x_test.shape[1:])}; give both one shape")
    classes = _num_classes(arrays.get("num_classes"), y_train, y_test, path)
    shape = x_train.shape[1:]
    image = len(shape) == 3 and shape[1] == shape[2]
    return Dataset(f"tensors:{path}", x_train, y_train, x_test, y_test, num_classes=classes,
                   in_channels=shape[0] if len(shape) >= 2 else 1,
                   image_size=int(shape[1]) if image else None,
                   info={"file": str(path), "train_samples": len(x_train),
                         "test_samples": len(x_test), "num_classes": classes})


def _read_arrays(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise UsageError(f"cannot read --data tensors:{path} ({type(e).__name__}); save it with "
                         "torch.save({...}) as .pt or numpy.savez as .npz") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"--data tensors:{path} holds a {type(loaded).__name__}, not a dict; "
                         "save a dict with train_x, train_y, test_x, test_y")
    return {str(k): v if isinstance(v, Tensor) else torch.as_tensor(v) for k, v in loaded.items()}


def _inputs(x: Tensor, key: str, path: Path) -> Tensor:
    if x.dim() < 1:
        raise UsageError(f"--data tensors:{path}: {key} is a scalar; give N samples, N x ...")
    return x.float().contiguous() if x.is_floating_point() else x.long().contiguous()


def _labels(y: Tensor, key: str, path: Path) -> Tensor:
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise UsageError(f"--data tensors:{path}: {key} is {y.dtype}; labels are class "
                         "indices: save them as integers (e.g. y.long())")
    y = y.long().contiguous()
    if y.numel() and int(y.min()) < 0:
        raise UsageError(f"--data tensors:{path}: {key} holds the label {int(y.min())}; labels "
                         "are class indices 0..C-1")
    return y


def _num_classes(given: Tensor | None, y_train: Tensor, y_test: Tensor, path: Path) -> int:
    top = max(int(y_train.max()), int(y_test.max())) + 1
    if given is None:
        return top
    classes = int(given)
    if top > classes:
        raise UsageError(f"--data tensors:{path}: labels reach {top - 1} but num_classes is "
                         f"{classes}; labels must lie in 0..{classes - 1} (or raise num_classes)")
    return classes
