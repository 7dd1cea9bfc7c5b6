"""The training loop: config, data, model, method, epochs, evaluation, metrics — top to bottom.

Every method (backprop, DDG, DNI) is driven through the same ``step(x, y, loss_fn)`` call,
so their numbers are comparable: same data order, same augmentation, same LR per
iteration, same evaluation.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ddgpipe.allocator import tune_allocator
from ddgpipe.checkpoint import Checkpoints, LoopState, atomic_torch_save
from ddgpipe.compensation import make_compensation, parse_compensation
from ddgpipe.data import BatchLoader, Dataset, load_dataset
from ddgpipe.devices import rank_device
from ddgpipe.distributed import COMMS
from ddgpipe.errors import UsageError
from ddgpipe.launch import threads_per_worker
from ddgpipe.methods import DDG, Backprop
from ddgpipe.methods.build import EXECUTORS, world_size
from ddgpipe.metrics import MetricsWriter, RunningStats
from ddgpipe.models import build_model
from ddgpipe.optim import make_lr_scheduler, make_optimizer, schedule_factor
from ddgpipe.precision import check_precision
from ddgpipe.threaded import threads_per_stage
from ddgpipe.timeline import Timeline

__all__ = ["TrainConfig", "TrainResult", "train", "train_worker", "evaluate", "METHODS"]

METHODS = ("bp", "ddg", "fr", "dni")


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``RUN_DIR/config.json``."""

    model: str = "resnet20"
    data: str = "digits"
    data_dir: str | None = None
    method: str = "bp"
    stages: int = 1
    replicas: int = 1  # R copies of the pipeline, each on 1/R of every minibatch
    stash: str = "graph"
    split: list[int] | None = None
    balance: str | None = None
    grad_shrink: float = 1.0
    compensation: str | None = None  # e.g. "sc,lwp": ddgpipe.compensation
    compensation_options: dict | None = None  # e.g. {"dc_lambda": 1.0}
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
    warmup_epochs: int = 0
    warmup_factor: float = 0.1
    seed: int = 0
    executor: str | None = None  # reference | threads | processes; None: the natural one
    device: str = "auto"
    devices: list[str] | None = None
    precision: str = "fp32"
    comm: str = "auto"
    threads: int | None = None
    log_every: int = 0
    timeline: bool = False
    label: str | None = None
    out: str | None = None
    progress: bool = True
    timeout_s: float = 300.0
    checkpoint_every: int = 0
    checkpoint_every_epochs: int = 0
    stop_after: int | None = None
    resume: str | None = None

    def display_label(self) -> str:
        if self.label:
            return self.label
        if self.method == "bp":
            return "BP"
        label = f"{self.method.upper()} K={self.stages}"
        if self.replicas > 1:
            label += f" x R={self.replicas}"
        return f"{label} {self.compensation}" if self.compensation else label

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
        if self.executor is not None and self.executor not in EXECUTORS:
            raise UsageError(f"unknown executor {self.executor!r}; choose one of "
                             f"{', '.join(EXECUTORS)}")
        if self.replicas < 1:
            raise UsageError(f"--replicas must be >= 1 (got {self.replicas})")
        if self.replicas > 1:
            self._validate_replicas()
        elif self.executor == "processes" and (self.method == "bp" or self.stages < 2):
            raise UsageError("--executor processes runs one process per stage: use it with "
                             "--method ddg, fr or dni and --stages 2 or more (or with "
                             "--replicas 2 or more)")
        check_precision(self.precision)
        if self.comm not in COMMS:
            raise UsageError(f"unknown --comm {self.comm!r}; choose one of {', '.join(COMMS)}")
        if self.devices is not None and self.method == "bp" and len(self.devices) != 1:
            raise UsageError("--devices names one device per stage; bp has one stage: use "
                             "--device")
        if not self.timeout_s > 0:
            raise UsageError(f"--timeout must be > 0 seconds (got {self.timeout_s})")
        if self.method == "fr" and self.stash != "graph":
            raise UsageError("--method fr always replays with current weights (stash none); "
                             "drop --stash, or use --method ddg --stash ...")
        compensated = self.compensation or self.compensation_options
        if compensated and self.method not in ("ddg", "fr"):
            raise UsageError(
                f"--compensation corrects the delayed gradients of --method ddg or fr; "
                f"--method {self.method} has none to correct (bp has no delay, dni learns from "
                "synthetic gradients): drop --compensation and its options, or use --method ddg"
            )
        if compensated:  # names, options, stash mode and optimizer fail here, before workers
            probe = make_optimizer(self.optimizer, self.lr, self.momentum, self.nesterov,
                                   self.weight_decay)([nn.Parameter(torch.zeros(1))])
            make_compensation(self.compensation, "none" if self.method == "fr" else self.stash,
                              compensation_options(self, steps_per_epoch=1), probe)
        if self.warmup_epochs < 0 or not 0 < self.warmup_factor <= 1:
            raise UsageError(f"--warmup-epochs must be >= 0 and --warmup-factor in (0, 1] "
                             f"(got {self.warmup_epochs}, {self.warmup_factor})")
        if self.checkpoint_every < 0 or self.checkpoint_every_epochs < 0:
            raise UsageError("--checkpoint-every and --checkpoint-every-epochs must be >= 0")
        if self.stop_after is not None and self.stop_after < 1:
            raise UsageError(f"--stop-after must be >= 1 (got {self.stop_after})")
        checkpoints = self.checkpoint_every or self.checkpoint_every_epochs or self.stop_after
        if (checkpoints or self.resume) and self.method == "dni":
            raise UsageError("checkpoints support --method bp, ddg and fr; not dni yet")
        if (checkpoints or self.resume) and not self.out:
            raise UsageError("checkpoints need an output directory; pass --out")
        if self.log_every < 0:
            raise UsageError(f"--log-every must be >= 0 (got {self.log_every})")

    def _validate_replicas(self) -> None:
        r = self.replicas
        if self.method not in ("ddg", "fr"):
            fix = ("--method ddg --stages 1 --replicas R is data-parallel backprop"
                   if self.method == "bp" else "drop --replicas")
            raise UsageError(f"--replicas averages the gradients of --method ddg or fr between "
                             f"their backward and their step; --method {self.method} has no "
                             f"replicas: {fix}")
        if self.executor in ("reference", "threads"):
            raise UsageError(f"--replicas {r} runs one process per stage and replica; "
                             f"--executor {self.executor} runs one process: use --executor "
                             "processes (or torchrun)")
        if self.batch_size % r:
            fit = self.batch_size - self.batch_size % r or r
            raise UsageError(
                f"--batch-size {self.batch_size} is the global minibatch, split into {r} equal "
                f"shards (one per replica), but {self.batch_size} is not divisible by {r}; "
                f"pass a multiple of {r}, e.g. --batch-size {fit}")
        if self.devices is not None and len(self.devices) != self.stages * r:
            raise UsageError(f"--devices names {len(self.devices)} device(s), but with replicas "
                             f"it names one per process: {self.stages} x {r} = "
                             f"{self.stages * r}")


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
    stopped: bool = False


def evaluate(method, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``method.model`` in eval mode (BatchNorm running
    stats), through ``method.predict``: across the stages' devices, or, under the process
    runtime, through the ranks, where only the last rank gets the numbers (the others NaN).
    """
    model = method.model
    method.sync()
    was_training = model.training
    model.eval()
    loss_sum, correct, answered = 0.0, 0, False
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = method.predict(x[i : i + batch_size])
            if logits is None:
                continue
            answered = True
            logits = logits.float()
            target = y[i : i + batch_size].to(logits.device)
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    if not answered:
        return float("nan"), float("nan")
    return loss_sum / len(x), correct / len(x)


def build_method(config: TrainConfig, model: nn.Module, steps_per_epoch: int, timeline,
                 sample_input: Tensor | None = None):
    optimizer = make_optimizer(
        config.optimizer, config.lr, config.momentum, config.nesterov, config.weight_decay
    )
    scheduler = make_lr_scheduler(
        config.lr_schedule, steps_per_epoch, config.epochs, config.milestones, config.lr_gamma,
        warmup_epochs=config.warmup_epochs, warmup_factor=config.warmup_factor,
    )
    if config.method == "bp":
        return Backprop(model, optimizer, lr_scheduler=scheduler, device=config.device,
                        precision=config.precision)
    kwargs = dict(lr_scheduler=scheduler, split=config.split, balance=config.balance,
                  sample_input=sample_input, timeline=timeline, peer_timeout_s=config.timeout_s,
                  executor=config.executor, device=config.device, devices=config.devices,
                  precision=config.precision, threads=stage_threads(config), comm=config.comm)
    if config.method in ("ddg", "fr"):
        # Features Replay (Huo et al., NeurIPS 2018) is DDG's schedule with the forward of
        # each delayed minibatch replayed from its stashed input with the *current* weights:
        # exactly stash mode "none".
        stash = "none" if config.method == "fr" else config.stash
        return DDG(model, config.stages, optimizer, stash=stash,
                   grad_shrink=config.grad_shrink, compensation=config.compensation,
                   compensation_options=compensation_options(config, steps_per_epoch),
                   replicas=config.replicas, **kwargs)
    from ddgpipe.methods.dni import DNI

    return DNI(model, config.stages, optimizer, **kwargs)


def compensation_options(config: TrainConfig, steps_per_epoch: int) -> dict:
    """The compensation's options; PipeMare's anneal period defaults to one epoch here."""
    options = dict(config.compensation_options or {})
    names = parse_compensation(config.compensation)
    if {"pipemare", "pipemare-lr"} & set(names) and options.get("pipemare_anneal") is None:
        options["pipemare_anneal"] = steps_per_epoch
    return options


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


def prepare_out_dir(out: str | None, keep: bool = False) -> Path | None:
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
    if not keep:  # a new run in an old directory must not inherit its files
        for stale in ("metrics.jsonl", "timeline.jsonl", "model.pt"):
            (path / stale).unlink(missing_ok=True)
        shutil.rmtree(path / "checkpoints", ignore_errors=True)
    return path


def train_worker(rank: int, world: int, config: TrainConfig) -> TrainResult | None:
    """Entry point of one spawned stage process (``--executor processes``)."""
    return train(config)


def gather_to_last(obj) -> list:
    """Collect one object from every rank on the last rank (a list there, [] elsewhere)."""
    world = dist.get_world_size()
    out = [None] * world if dist.get_rank() == world - 1 else None
    dist.gather_object(obj, out, dst=world - 1)
    return out or []


class InterruptGuard:
    """Ctrl-C must end a run even when the KeyboardInterrupt it raises lands in code that
    swallows exceptions: a finaliser, a ``__del__`` or a generator collected on the main thread
    only prints "Exception ignored" and training would go on to the end. So the handler also
    records the request, and the loop raises it again at the next minibatch (:meth:`check`).
    Installed only on the main thread and only over Python's default handler, so a program
    that set its own keeps it."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> InterruptGuard:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def train(config: TrainConfig, dataset: Dataset | None = None) -> TrainResult | None:
    """Train one run as ``config`` says; metrics go to ``config.out`` when given.

    Under torch.distributed (one process per stage and replica) every rank calls this; the
    last rank writes the metrics and returns the result, the others return None.
    """
    config.validate()
    tune_allocator()  # why: ddgpipe/allocator.py
    rank, world = (dist.get_rank(), dist.get_world_size()) if world_size() > 1 else (0, 1)
    if world > 1:  # one stage per process: each takes its share of this node's cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(config.threads or threads_per_worker(local))
        here = rank_device(config.device, config.devices)
        if here.type == "cuda":
            torch.cuda.set_device(here)
    else:  # every stage's share of the cores, on this thread too (the reference, evaluation)
        torch.set_num_threads(stage_threads(config))
    # The last stage has the loss: it writes the metrics and shows progress.
    reporter = rank == world - 1
    checkpoints = Checkpoints(config, rank, world)  # a run to resume from is checked first
    data = dataset or load_dataset(config.data, config.data_dir)
    run_dir = prepare_out_dir(config.out, keep=checkpoints.resuming) if reporter else None

    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes=data.num_classes, input_shape=data.input_shape)
    check_model_accepts(model, data, config)
    loader = BatchLoader(data.train_x, data.train_y, config.batch_size, shuffle=True,
                         seed=config.seed, augment=data.augment, name=data.name)
    timeline = Timeline(rank=rank if world > 1 else None) if config.timeline else None
    method = build_method(config, model, len(loader), timeline,
                          sample_input=data.train_x[: config.batch_size])
    try:
        with InterruptGuard() as interrupts:
            return _train_loop(config, data, model, loader, method, timeline, checkpoints,
                               run_dir, world, reporter, interrupts)
    finally:
        method.close()  # never leave a stage thread behind, whatever happened


def _train_loop(config: TrainConfig, data: Dataset, model: nn.Module, loader: BatchLoader,
                method, timeline: Timeline | None, checkpoints: Checkpoints,
                run_dir: Path | None, world: int, reporter: bool,
                interrupts: InterruptGuard) -> TrainResult | None:
    executor = getattr(method, "executor", None)
    used_split = getattr(executor, "split", None)
    # Batches are gathered (and augmented) where the first stage computes.
    first = method.stages[0] if hasattr(method, "stages") else method
    loader.to(first.device)

    loop = checkpoints.restore(method, run_dir)
    if not checkpoints.resuming and run_dir is not None:
        saved = dataclasses.asdict(config) | {"label": config.display_label(),
                                              "num_blocks": len(model), "split": used_split,
                                              "split_tuning": getattr(executor, "split_tuning",
                                                                      None),
                                              "executor": method.executor_kind,
                                              "stage_devices": [str(s.device) for s in
                                                                getattr(method, "stages",
                                                                        [method])],
                                              "threads_per_stage": stage_threads(config)}
        (run_dir / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    metrics = MetricsWriter(run_dir / "metrics.jsonl") if run_dir is not None else None

    stats = RunningStats()

    def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
        loss = F.cross_entropy(logits, target)
        stats.add(loss.detach(), logits.detach(), target)  # no host sync: it may run on a GPU
        return loss

    def checkpoint(epoch: int, batch: int, elapsed: float) -> None:
        checkpoints.save(method, LoopState(
            iteration=iteration, epoch=epoch, batch=batch, seen=seen, train_time=train_time,
            epoch_elapsed=elapsed, stats=stats.state(),
            metrics_lines=metrics.lines if metrics else 0))

    factor = schedule_factor(config.lr_schedule, len(loader), config.epochs, config.milestones,
                             config.lr_gamma, warmup_epochs=config.warmup_epochs,
                             warmup_factor=config.warmup_factor)

    def lr_at(iteration: int) -> float:  # every stage's lr at a clock: the schedule's
        return config.lr * factor(iteration)

    test_loss, test_acc = float("nan"), 0.0
    iteration, seen, train_time = loop.iteration, loop.seen, loop.train_time
    show = reporter and config.progress and sys.stderr.isatty() and not os.environ.get("CI")
    for epoch in range(loop.epoch, config.epochs):
        first_batch = loop.batch if epoch == loop.epoch else 0
        stats.reset()
        if epoch == loop.epoch:
            stats.load_state(loop.stats)
        method.train()
        start = time.perf_counter() - (loop.epoch_elapsed if epoch == loop.epoch else 0.0)
        bar = tqdm(total=len(loader), initial=first_batch, disable=not show, leave=False,
                   desc=f"{config.display_label()} epoch {epoch + 1}/{config.epochs}")
        batches = loader.epoch(epoch, start=first_batch)
        batch = first_batch
        while batch < len(loader):
            interrupts.check()
            # Feed up to the next checkpoint (a clock boundary), so a pipeline that runs ahead
            # of its losses never holds minibatches beyond it when the checkpoint is taken.
            segment = min(len(loader) - batch, until_checkpoint(config, iteration))
            for loss in method.run(itertools.islice(batches, segment), loss_fn):
                interrupts.check()
                iteration += 1
                batch += 1
                bar.update(1)
                if metrics and config.log_every and iteration % config.log_every == 0:
                    metrics.write("iter", iteration=iteration, epoch=epoch + 1, loss=loss,
                                  lr=lr_at(iteration - 1))
                if show and iteration % 5 == 0:
                    seconds = time.perf_counter() - start
                    bar.set_postfix(loss=f"{stats.loss:.3f}",
                                    img_s=f"{stats.seen / seconds:.0f}")
            stop = config.stop_after is not None and iteration >= config.stop_after
            if stop or (config.checkpoint_every and iteration % config.checkpoint_every == 0):
                checkpoint(epoch, batch, time.perf_counter() - start)
            if stop:
                bar.close()
                if metrics:
                    metrics.close()
                return stopped_result(config, iteration, run_dir) if reporter else None
        bar.close()
        if epoch == config.epochs - 1:
            method.drain()  # the last delayed gradients are learned before the final test
        seconds = time.perf_counter() - start
        train_time += seconds
        stats.load_state(method.sum_over_replicas(stats.state()))  # every replica's shard
        seen += stats.seen
        test_loss, test_acc = evaluate(method, data.test_x, data.test_y,
                                       config.eval_batch_size)
        if metrics:
            metrics.write(
                "epoch", epoch=epoch + 1, iteration=iteration, train_loss=stats.loss,
                train_acc=stats.accuracy, test_loss=test_loss, test_acc=test_acc, lr=method.lr,
                images_per_s=stats.seen / seconds, wall_time=train_time,
            )
        every = config.checkpoint_every_epochs
        if every and (epoch + 1) % every == 0 and epoch + 1 < config.epochs:
            stats.reset()
            checkpoint(epoch + 1, 0, 0.0)
    if metrics:
        metrics.close()
    if timeline is not None:
        records = gather_to_last(timeline.records) if world > 1 else [timeline.records]
        if run_dir is not None:
            timeline.records = [r for part in records for r in part]
            timeline.write(run_dir / "timeline.jsonl")
    save_final_model(model, method, run_dir, world)
    if not reporter:
        return None
    return TrainResult(
        label=config.display_label(), method=config.method, stages=config.stages,
        test_acc=test_acc, test_loss=test_loss, train_loss=stats.loss,
        train_time_s=train_time, images_per_s=seen / max(train_time, 1e-9),
        run_dir=str(run_dir) if run_dir else None,
    )


def stopped_result(config: TrainConfig, iteration: int, run_dir: Path | None) -> TrainResult:
    print(f"stopped after iteration {iteration} (--stop-after); resume with "
          f"--resume {config.out}", file=sys.stderr)
    return TrainResult(label=config.display_label(), method=config.method,
                       stages=config.stages, test_acc=float("nan"), test_loss=float("nan"),
                       train_loss=float("nan"), train_time_s=0.0, images_per_s=0.0,
                       run_dir=str(run_dir) if run_dir else None, stopped=True)


def save_final_model(model: nn.Module, method, run_dir: Path | None, world: int) -> None:
    """The trained network as one ``state_dict`` in ``RUN_DIR/model.pt`` (atomic).

    Under the runtime each rank trained only its slice; the slices keep the whole model's
    key names, so the last rank merges them.
    """
    method.sync()
    if world > 1:
        parts = gather_to_last(_on_cpu(method.stages[0].module.state_dict()))
        merged = {k: v for part in parts for k, v in part.items()}
    else:
        merged = _on_cpu(model.state_dict())
    if run_dir is not None:
        atomic_torch_save(merged, run_dir / "model.pt")


def until_checkpoint(config: TrainConfig, iteration: int) -> int:
    """Iterations from ``iteration`` to the next one that checkpoints or stops (or a lot)."""
    ahead = [2**62]
    if config.checkpoint_every:
        ahead.append(config.checkpoint_every - iteration % config.checkpoint_every)
    if config.stop_after is not None:
        ahead.append(max(1, config.stop_after - iteration))
    return min(ahead)


def _on_cpu(state: dict) -> dict:
    """A state dict with every tensor on the CPU: ``model.pt`` loads anywhere."""
    return {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in state.items()}


def stage_threads(config: TrainConfig) -> int:
    """Intra-op threads each stage computes with: ``--threads``, or its share of the cores.

    Every in-process executor gives each stage the same count (the threaded one on each stage
    thread, the reference on its one thread), so their numbers agree.
    """
    if config.threads:
        return config.threads
    return threads_per_stage(1 if config.method == "bp" else config.stages)
