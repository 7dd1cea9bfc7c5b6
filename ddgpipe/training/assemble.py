"""A run's pieces from its config: the method (backprop, DDG, DNI) and a check that the model
and the data fit together."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddgpipe.core.timeline import Timeline
from ddgpipe.data import Dataset
from ddgpipe.errors import UsageError
from ddgpipe.methods import DDG, Backprop, Method
from ddgpipe.methods.dni import DNI
from ddgpipe.training.config import TrainConfig, compensation_options
from ddgpipe.training.optim import make_lr_scheduler, make_optimizer
from ddgpipe.training.recipes import momentum_decay_for, warmup_for

__all__ = ["build_method", "check_model_accepts"]


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


def check_model_accepts(model: nn.Module, data: Dataset, config: TrainConfig) -> None:
    """Fail early, in one line, when the model and the data do not fit together."""
    sample = data.train_x[:2]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UsageError(
            f"model {config.model} cannot take {data.name} inputs of shape "
            f"{tuple(sample.shape[1:])} ({first}); build it for this data's channels and size"
        ) from None
    finally:
        model.train(was_training)
    expected = (2, *data.train_y.shape[1:], data.num_classes)
    if not isinstance(out, Tensor) or out.shape != expected:
        got = tuple(out.shape[1:]) if isinstance(out, Tensor) else type(out).__name__
        raise UsageError(
            f"model {config.model} outputs {got} but {data.name} needs "
            f"{expected[1:]} ({data.num_classes} classes); build it with "
            f"num_classes={data.num_classes}"
        )


