"""A run's pieces from its config: the method (backprop, DDG, DNI) and a check that the model
and the data fit together."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddgpipe.core.timeline import Timeline
from ddgpipe.data import Dataset
from ddgpipe.errors import UsageError
from ddgpipe.losses import logits_of
from ddgpipe.methods import DDG, Backprop, Method
from ddgpipe.methods.dni import DNI
from ddgpipe.models import build_model, is_user_model, load_user_model
from ddgpipe.training.config import TrainConfig, compensation_options
from ddgpipe.training.optim import make_lr_scheduler, make_optimizer
from ddgpipe.training.recipes import momentum_decay_for, warmup_for

__all__ = ["build_method", "build_network", "check_model_accepts"]


def build_method(config: TrainConfig, model: nn.Module, steps_per_epoch: int,
                 timeline: Timeline | None, sample_input: Tensor | None = None,
                 total_iterations: int | None = None) -> Method:
    """The method ``config`` names, its optimizer and LR schedule, placed as it says."""
    total = total_iterations or steps_per_epoch * config.epochs
    optimizer = make_optimizer(
        config.optimizer, config.lr, config.momentum, config.nesterov, config.weight_decay,
        betas=config.betas, adamw_only=muon_exclusions(model),
        momentum_decay=momentum_decay_for(config, total),
    )
    scheduler = make_lr_scheduler(
        config.lr_schedule, steps_per_epoch, config.epochs, config.milestones, config.lr_gamma,
        warmup_epochs=config.warmup_epochs, warmup_factor=config.warmup_factor,
        warmup_iters=warmup_for(config, total), total_iterations=total_iterations,
        lr_floor=config.lr_floor,
    )
    if config.method == "bp":
        return Backprop(model, optimizer, lr_scheduler=scheduler, clip_grad=config.clip_grad,
                        device=config.placement.device, precision=config.precision,
                        compile=config.compile)
    placement = config.stage_placement()
    if config.method == "dni":
        return DNI(model, config.stages, optimizer, lr_scheduler=scheduler,
                   sample_input=sample_input, timeline=timeline, precision=config.precision,
                   placement=placement)
    # Features Replay (Huo et al., NeurIPS 2018) is DDG's schedule with the forward of
    # each delayed minibatch replayed from its stashed input with the *current* weights:
    # exactly stash mode "none".
    stash = "none" if config.method == "fr" else config.stash
    return DDG(model, config.stages, optimizer, lr_scheduler=scheduler, stash=stash,
               sample_input=sample_input, grad_shrink=config.grad_shrink,
               microbatches=config.microbatches,
               clip_grad=config.clip_grad, compensation=config.compensation.names,
               compensation_options=compensation_options(config, steps_per_epoch),
               timeline=timeline, precision=config.precision, compile=config.compile,
               placement=placement)


def muon_exclusions(model: nn.Module) -> frozenset[int]:
    """The matrices Muon leaves to AdamW, as its authors do: embeddings, and the output
    layer (the last linear layer of the last block)."""
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    last = list(model.children())[-1] if isinstance(model, nn.Sequential) else model
    outputs = [m.weight for m in last.modules() if isinstance(m, nn.Linear)][-1:]
    return frozenset(id(p) for p in embeddings + outputs)


def build_network(config: TrainConfig, data: Dataset) -> nn.Module:
    """The model ``config.model`` names, for ``data``, from the RNG seeded by the run's seed:
    the registry's, or a user's (``FILE.py:FACTORY``, ``package.module:FACTORY``, ``hf:DIR``;
    a factory is called again on resume)."""
    torch.manual_seed(config.seed)
    if is_user_model(config.model):
        return load_user_model(config.model, num_classes=data.num_classes,
                               input_shape=data.input_shape)
    return build_model(config.model, num_classes=data.num_classes, input_shape=data.input_shape,
                       **config.model_options())


def check_model_accepts(model: nn.Module, data: Dataset, config: TrainConfig) -> None:
    """Fail early, in one line, when the model and the data do not fit together."""
    if data.tokens:
        check_vocabulary(model, data, config)
    sample = data.train_x[:2]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = logits_of(model(sample))
    except (RuntimeError, IndexError, ValueError, TypeError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(
            f"model {config.model} cannot take {data.name} inputs of shape "
            f"{tuple(sample.shape[1:])} ({first}); build it for this data's channels and size"
        ) from None
    finally:
        model.train(was_training)
    if is_user_model(config.model):
        check_user_output(out, data, config)
        return
    expected = (2, *data.train_y.shape[1:], data.num_classes)
    if not isinstance(out, Tensor) or out.shape != expected:
        got = tuple(out.shape[1:]) if isinstance(out, Tensor) else type(out).__name__
        raise UsageError(
            f"model {config.model} outputs {got} but {data.name} needs "
            f"{expected[1:]} ({data.num_classes} classes); build it with "
            f"num_classes={data.num_classes}"
        )


def check_user_output(out: object, data: Dataset, config: TrainConfig) -> None:
    """A user's model gives one score per class (or token) for each label, and more scores
    than the largest label: it may have more classes than the data use."""
    labels = (*data.train_y.shape[1:],)
    if not isinstance(out, Tensor) or out.dim() != len(labels) + 2 or \
            tuple(out.shape[1:-1]) != labels:
        got = tuple(out.shape[1:]) if isinstance(out, Tensor) else type(out).__name__
        raise UsageError(f"model {config.model} outputs {got} per sample but {data.name} needs "
                         f"{(*labels, 'C')}, one score per class; make its forward return "
                         "logits of that shape")
    top = int(max(data.train_y.max(), data.test_y.max()))
    if top >= out.shape[-1]:
        what = "token ids" if data.tokens else "labels"
        raise UsageError(f"{data.name} has {what} up to {top} but model {config.model} outputs "
                         f"{out.shape[-1]} classes; build it with num_classes="
                         f"{data.num_classes} (or more)")


def check_vocabulary(model: nn.Module, data: Dataset, config: TrainConfig) -> None:
    """Token ids the model's input embedding has no row for are refused before a forward (a
    HuggingFace model names its input embedding; elsewhere the largest embedding counts)."""
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    if not isinstance(embedding, nn.Embedding):
        embedding = max((m for m in model.modules() if isinstance(m, nn.Embedding)),
                        key=lambda m: m.num_embeddings, default=None)
    if embedding is None:
        return
    top = int(max(data.train_x.max(), data.test_x.max()))
    if top >= embedding.num_embeddings:
        fix = ("pass the --tokenizer that matches the model" if config.tokenizer else
               "give the model a vocabulary of 256 or more (byte tokens), or pass --tokenizer "
               "DIR for the model's own tokens")
        raise UsageError(f"{data.name} has token ids up to {top} but model {config.model} has a "
                         f"vocabulary of {embedding.num_embeddings}; {fix}")
