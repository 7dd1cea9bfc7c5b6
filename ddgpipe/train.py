"""The training loop: config, data, model, method, epochs, evaluation, metrics — top to bottom.

Every method (backprop, DDG, DNI) is driven through the same ``step(x, y, loss_fn)`` call,
so their numbers are comparable: same data order, same augmentation, same LR per
iteration, same evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ddgpipe.data import BatchLoader, Dataset, load_dataset
from ddgpipe.errors import UsageError
from ddgpipe.launch import threads_per_worker
from ddgpipe.methods import DDG, Backprop
from ddgpipe.methods.build import world_size
from ddgpipe.metrics import MetricsWriter, RunningStats
from ddgpipe.models import build_model
from ddgpipe.optim import make_lr_scheduler, make_optimizer
from ddgpipe.timeline import Timeline

__all__ = ["TrainConfig", "TrainResult", "train", "train_worker", "evaluate", "METHODS"]

METHODS = ("bp", "ddg", "dni")


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``RUN_DIR/config.json``."""

    model: str = "resnet20"
    data: str = "digits"
    data_dir: str | None = None
    method: str = "bp"
    stages: int = 1
    stash: str = "graph"
    split: list[int] | None = None
    balance: str | None = None
    grad_shrink: float = 1.0
    epochs: int = 15
    batch_size: int = 64
    eval_batch_size: int = 512
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    seed: int = 0
    threads: int | None = None
    log_every: int = 0
    timeline: bool = False
    label: str | None = None
    out: str | None = None
    progress: bool = True
    launcher: str = "none"
    timeout_s: float = 300.0

    def display_label(self) -> str:
        if self.label:
            return self.label
        return "BP" if self.method == "bp" else f"{self.method.upper()} K={self.stages}"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.epochs < 1:
            raise UsageError(f"--epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.eval_batch_size < 1:
            raise UsageError(f"--eval-batch-size must be >= 1 (got {self.eval_batch_size})")
        if self.stages < 1:
            raise UsageError(f"--stages must be >= 1 (got {self.stages})")
        if self.method == "bp" and self.stages != 1:
            raise UsageError(
                f"--method bp runs the whole network as one module (got --stages {self.stages}); "
                "use --method ddg or dni to cut it into stages"
            )
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1 (got {self.threads})")
        if self.launcher not in ("none", "local"):
            raise UsageError(f"unknown launcher {self.launcher!r}; choose none or local")
        if not self.timeout_s > 0:
            raise UsageError(f"--timeout must be > 0 seconds (got {self.timeout_s})")
        if self.log_every < 0:
            raise UsageError(f"--log-every must be >= 0 (got {self.log_every})")


@dataclass
class TrainResult:
    label: str
    method: str
    stages: int
    test_acc: float
    test_loss: float
    train_loss: float
    train_time_s: float
    images_per_s: float
    run_dir: str | None


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int,
             executor=None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (BatchNorm running stats).

    With a distributed ``executor`` the batches flow through the stages' ranks; only the last
    rank gets the numbers (the others return NaN).
    """
    forward = executor.forward_only if executor is not None else model
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = forward(x[i : i + batch_size])
            if logits is None:
                continue
            target = y[i : i + batch_size]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    if executor is not None and not executor.stage.is_last:
        return float("nan"), float("nan")
    return loss_sum / len(x), correct / len(x)


def build_method(config: TrainConfig, model: nn.Module, steps_per_epoch: int, timeline,
                 sample_input: Tensor | None = None):
    optimizer = make_optimizer(
        config.optimizer, config.lr, config.momentum, config.nesterov, config.weight_decay
    )
    scheduler = make_lr_scheduler(
        config.lr_schedule, steps_per_epoch, config.epochs, config.milestones, config.lr_gamma
    )
    if config.method == "bp":
        return Backprop(model, optimizer, lr_scheduler=scheduler)
    kwargs = dict(lr_scheduler=scheduler, split=config.split, balance=config.balance,
                  sample_input=sample_input, timeline=timeline, peer_timeout_s=config.timeout_s)
    if config.method == "ddg":
        return DDG(model, config.stages, optimizer, stash=config.stash,
                   grad_shrink=config.grad_shrink, **kwargs)
    from ddgpipe.methods.dni import DNI

    return DNI(model, config.stages, optimizer, **kwargs)


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
    if out.shape != (2, data.num_classes):
        raise UsageError(
            f"model {config.model} outputs shape {tuple(out.shape[1:])} but {data.name} has "
            f"{data.num_classes} classes; build it with num_classes={data.num_classes}"
        )


def prepare_out_dir(out: str | None) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"cannot write to output directory {path} ({e.strerror}); pass --out a writable path"
        ) from None
    for stale in ("metrics.jsonl", "timeline.jsonl"):
        (path / stale).unlink(missing_ok=True)
    return path


def train_worker(rank: int, world: int, config: TrainConfig) -> TrainResult | None:
    """Entry point of one spawned stage process (``--launcher local``)."""
    return train(config)


def gather_to_last(obj) -> list:
    """Collect one object from every rank on the last rank (a list there, [] elsewhere)."""
    world = dist.get_world_size()
    out = [None] * world if dist.get_rank() == world - 1 else None
    dist.gather_object(obj, out, dst=world - 1)
    return out or []


def train(config: TrainConfig, dataset: Dataset | None = None) -> TrainResult | None:
    """Train one run as ``config`` says; metrics go to ``config.out`` when given.

    Under torch.distributed (one process per stage) every rank calls this; the last rank
    writes the metrics and returns the result, the others return None.
    """
    config.validate()
    rank, world = (dist.get_rank(), dist.get_world_size()) if world_size() > 1 else (0, 1)
    if config.threads:
        torch.set_num_threads(config.threads)
    elif world > 1:  # one stage per process: each takes its share of this node's cores
        torch.set_num_threads(threads_per_worker(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    # The last stage has the loss: it writes the metrics and shows progress.
    reporter = rank == world - 1
    data = dataset or load_dataset(config.data, config.data_dir)
    run_dir = prepare_out_dir(config.out) if reporter else None

    torch.manual_seed(config.seed)
    model = build_model(config.model, data.in_channels, data.image_size, data.num_classes)
    check_model_accepts(model, data, config)
    loader = BatchLoader(data.train_x, data.train_y, config.batch_size, shuffle=True,
                         seed=config.seed, augment=data.augment)
    timeline = Timeline(rank=rank if world > 1 else None) if config.timeline else None
    method = build_method(config, model, len(loader), timeline,
                          sample_input=data.train_x[: config.batch_size])
    executor = method.executor if world > 1 else None

    if run_dir is not None:
        used_split = getattr(getattr(method, "executor", None), "split", None)
        saved = dataclasses.asdict(config) | {"label": config.display_label(),
                                              "num_blocks": len(model), "split": used_split}
        (run_dir / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    metrics = MetricsWriter(run_dir / "metrics.jsonl") if run_dir is not None else None

    stats = RunningStats()

    def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
        loss = F.cross_entropy(logits, target)
        stats.add(loss.item(), logits.detach(), target)
        return loss

    iteration, seen, train_time, test_loss, test_acc = 0, 0, 0.0, float("nan"), 0.0
    show = reporter and config.progress and sys.stderr.isatty() and not os.environ.get("CI")
    for epoch in range(config.epochs):
        stats.reset()
        method.train()
        start = time.perf_counter()
        bar = tqdm(loader.epoch(epoch), total=len(loader), disable=not show, leave=False,
                   desc=f"{config.display_label()} epoch {epoch + 1}/{config.epochs}")
        for x, y in bar:
            lr = method.lr
            loss = method.step(x, y, loss_fn)
            iteration += 1
            if metrics and config.log_every and iteration % config.log_every == 0:
                metrics.write("iter", iteration=iteration, epoch=epoch + 1, loss=loss, lr=lr)
            if show and iteration % 5 == 0:
                seconds = time.perf_counter() - start
                bar.set_postfix(loss=f"{stats.loss:.3f}", img_s=f"{stats.seen / seconds:.0f}")
        if epoch == config.epochs - 1:
            method.drain()  # the last delayed gradients are learned before the final test
        seconds = time.perf_counter() - start
        train_time += seconds
        seen += stats.seen
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y, config.eval_batch_size,
                                       executor)
        if metrics:
            metrics.write(
                "epoch", epoch=epoch + 1, iteration=iteration, train_loss=stats.loss,
                train_acc=stats.accuracy, test_loss=test_loss, test_acc=test_acc, lr=method.lr,
                images_per_s=stats.seen / seconds, wall_time=train_time,
            )
    if metrics:
        metrics.close()
    if timeline is not None:
        records = gather_to_last(timeline.records) if world > 1 else [timeline.records]
        if run_dir is not None:
            timeline.records = [r for part in records for r in part]
            timeline.write(run_dir / "timeline.jsonl")
    if not reporter:
        return None
    return TrainResult(
        label=config.display_label(), method=config.method, stages=config.stages,
        test_acc=test_acc, test_loss=test_loss, train_loss=stats.loss,
        train_time_s=train_time, images_per_s=seen / train_time,
        run_dir=str(run_dir) if run_dir else None,
    )
