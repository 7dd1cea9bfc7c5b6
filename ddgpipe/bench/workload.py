"""What every bench configuration trains: the model, its synthetic batch and its loss.

Images for the ResNets and the MLP (``image_size`` x ``image_size``, ``in_channels``), signals
for the 1-D ResNets (``in_channels`` x ``image_size``, mnist1d's 1 x 40 shape with
``--image-size 40``), token windows for a language model (``gpt-L``: ``context`` byte tokens,
vocabulary 256), images for a user's ``FILE.py:FACTORY``, built from the bench's seed so every
configuration trains the same weights on the same batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddgpipe.bench.config import OPTIMIZERS, BenchConfig
from ddgpipe.core.stage import LossFn
from ddgpipe.errors import UsageError
from ddgpipe.losses import token_cross_entropy
from ddgpipe.models import build_model, is_language_model, is_user_model, load_user_model
from ddgpipe.models.registry import RESNET1D_DEPTHS

__all__ = ["bench_model", "bench_batch", "bench_loss", "bench_optimizer", "tokens_per_sample",
           "VOCAB"]

VOCAB = 256


def bench_model(cfg: BenchConfig) -> nn.Sequential:
    """The benched network from the bench's seed: the registry's, or a user's factory
    (``FILE.py:FACTORY``), given images of ``in_channels`` x ``image_size``^2 and
    ``num_classes``."""
    torch.manual_seed(cfg.seed)
    if is_user_model(cfg.model):
        return user_bench_model(cfg)
    if is_language_model(cfg.model):
        return build_model(cfg.model, num_classes=VOCAB, context=cfg.context, width=cfg.width)
    return build_model(cfg.model, in_channels=cfg.in_channels, image_size=cfg.image_size,
                       num_classes=cfg.num_classes)


def user_bench_model(cfg: BenchConfig) -> nn.Sequential:
    """A user's factory, called as ``ddgpipe train`` calls it, for the bench's images."""
    if cfg.model.startswith("hf:"):
        raise UsageError(f"the bench times image networks and gpt-L; --model {cfg.model} is a "
                         "HuggingFace LM: time it with `ddgpipe train --timeline` instead")
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    model = load_user_model(cfg.model, num_classes=cfg.num_classes, input_shape=shape)
    if not isinstance(model, nn.Sequential):
        raise UsageError(f"the bench cuts an nn.Sequential of blocks, but {cfg.model} returned "
                         f"a {type(model).__name__}; return the layers as an nn.Sequential")
    return model


def bench_batch(cfg: BenchConfig, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """One synthetic batch from a seeded generator, reused at every step."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    if is_language_model(cfg.model):
        ids = torch.randint(0, VOCAB, (cfg.batch_size, cfg.context + 1), generator=gen)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    else:
        side = () if cfg.model in RESNET1D_DEPTHS else (cfg.image_size,)
        x = torch.randn(cfg.batch_size, cfg.in_channels, cfg.image_size, *side, generator=gen)
        y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen)
    device = device or torch.device("cpu")
    return x.to(device), y.to(device)


def bench_loss(cfg: BenchConfig) -> LossFn:
    return token_cross_entropy if is_language_model(cfg.model) else F.cross_entropy


def bench_optimizer(cfg: BenchConfig) -> Callable[[Iterable], torch.optim.Optimizer]:
    """``params -> optimizer`` for ``cfg.optimizer`` (:data:`OPTIMIZERS`): every row, and
    every stage of a DDG row, builds its own from the same settings."""
    settings = dict(OPTIMIZERS[cfg.optimizer])
    return functools.partial(getattr(torch.optim, settings.pop("name")), **settings)


def tokens_per_sample(cfg: BenchConfig) -> int:
    """Tokens in one sample: a language model's context, 1 for an image (so that samples/s
    times this is tokens/s, or images/s)."""
    return cfg.context if is_language_model(cfg.model) else 1
