"""The training loop: config, data, model, method, epochs, evaluation, metrics — top to bottom.

Every method (backprop, DDG, DNI) is driven through the same ``step(x, y, loss_fn)`` call,
so their numbers are comparable: same data order, same augmentation, same LR per
iteration, same evaluation.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ddgpipe.core.timeline import Timeline
from ddgpipe.data import BatchLoader, Dataset, load_dataset
from ddgpipe.errors import UsageError
from ddgpipe.losses import logits_of, token_cross_entropy
from ddgpipe.machine import machine_info
from ddgpipe.methods import Method
from ddgpipe.models import is_user_model
from ddgpipe.runtime.allocator import tune_allocator
from ddgpipe.runtime.devices import cores_per_stage, rank_device
from ddgpipe.runtime.placement import world_size
from ddgpipe.training.assemble import build_method, build_network, check_model_accepts
from ddgpipe.training.checkpoints import Checkpoints, LoopState
from ddgpipe.training.config import TrainConfig, TrainResult, stage_threads
from ddgpipe.training.evaluation import bits_per_byte, evaluate
from ddgpipe.training.interrupts import InterruptGuard
from ddgpipe.training.metrics import MetricsWriter, RunningStats, plain_record
from ddgpipe.training.optim import schedule_factor
from ddgpipe.training.recipes import warmup_for
from ddgpipe.training.run_dir import gather_to_last, prepare_out_dir, save_final_model
from ddgpipe.training.sinks import Sink, open_sinks
from ddgpipe.training.validation import check_config

# what ``train(config, callback=...)`` calls with every metrics record: kind, values
RecordCallback = Callable[[str, dict[str, Any]], None]

__all__ = ["train", "train_worker"]


def train_worker(rank: int, world: int, config: TrainConfig) -> TrainResult | None:
    """Entry point of one spawned stage process (``--executor processes``)."""
    return train(config)


def train(config: TrainConfig, dataset: Dataset | None = None, *,
          model: nn.Module | Callable[[], nn.Module] | None = None,
          tune_malloc: bool = True, callback: RecordCallback | None = None
          ) -> TrainResult | None:
    """Train one run as ``config`` says; metrics go to ``config.out`` when given, to the
    sinks ``config.log`` names, and to ``callback(kind, values)``, record by record.

    The model and data are those ``config`` names (the registry's, or a user's:
    ``config.model="FILE.py:FACTORY"`` or ``"hf:DIR"``, ``config.data="text:PATH"`` or
    ``"tensors:PATH"``), or given here: ``dataset`` a :class:`Dataset`, ``model`` a module or
    a factory (called under the run's seed). A module given here is recorded as
    ``object:CLASS``; to resume, pass it (or its factory) again.

    Under torch.distributed (one process per stage and replica) every rank calls this; the
    last rank writes the metrics and returns the result, the others return None.

    A run owns its process: it sets torch's intra-op thread count to each stage's share of
    the cores, catches Ctrl-C (over Python's default handler only), and, with
    ``tune_malloc``, makes glibc's malloc keep the memory it frees, so steps stop
    page-faulting (:func:`ddgpipe.runtime.allocator.tune_allocator` says why).
    """
    if model is not None and not is_user_model(config.model):
        name = getattr(model, "__name__", type(model).__name__)
        config = dataclasses.replace(config, model=f"object:{name}")
    check_config(config)
    if tune_malloc:
        tune_allocator()
    rank, world = (dist.get_rank(), dist.get_world_size()) if world_size() > 1 else (0, 1)
    if world > 1:  # one stage per process: each takes its share of this node's cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(config.placement.threads or cores_per_stage(local))
        here = rank_device(config.placement.device, config.placement.devices)
        if here.type == "cuda":
            torch.cuda.set_device(here)
    else:  # every stage's share of the cores, on this thread too (the reference, evaluation)
        torch.set_num_threads(stage_threads(config))
    # The last stage has the loss: it writes the metrics and shows progress.
    reporter = rank == world - 1
    checkpoints = Checkpoints(config, rank, world)  # a run to resume from is checked first
    data = dataset or load_dataset(config.data, config.data_dir, context=config.context,
                                   tokenizer=config.tokenizer)
    run_dir = prepare_out_dir(config.out, keep=checkpoints.resuming,
                              overwrite=config.overwrite) if reporter else None

    model = given_network(model, config.seed) if model is not None else \
        build_network(config, data)
    check_model_accepts(model, data, config)
    loader = BatchLoader(data.train_x, data.train_y, config.batch_size, shuffle=True,
                         seed=config.seed, augment=data.augment, name=data.name)
    timeline = Timeline(rank=rank if world > 1 else None) if config.timeline else None
    method = build_method(config, model, len(loader), timeline,
                          sample_input=data.train_x[: config.batch_size],
                          total_iterations=total_iterations(config, len(loader)))
    try:
        with InterruptGuard() as interrupts:
            run = TrainingRun(config, data, model, loader, method, timeline=timeline,
                              checkpoints=checkpoints, run_dir=run_dir, world=world,
                              reporter=reporter, interrupts=interrupts, callback=callback)
            return run.run()
    finally:
        method.close()  # never leave a stage thread behind, whatever happened


class TrainingRun:
    """One run's loop and where it stands (iteration, epoch, batch, samples, time).

    :meth:`run` reads top to bottom: start (or resume), then per epoch its iterations, with
    checkpoints and evaluations at clock boundaries, the end of the epoch, and finish. Every
    metrics record passes through :meth:`record`, where sinks and callbacks hook in.
    """

    def __init__(self, config: TrainConfig, data: Dataset, model: nn.Module,
                 loader: BatchLoader, method: Method, *, timeline: Timeline | None,
                 checkpoints: Checkpoints, run_dir: Path | None, world: int, reporter: bool,
                 interrupts: InterruptGuard, callback: RecordCallback | None = None):
        self.config, self.data, self.model, self.loader, self.method = (
            config, data, model, loader, method)
        self.timeline, self.checkpoints, self.run_dir = timeline, checkpoints, run_dir
        self.world, self.reporter, self.interrupts = world, reporter, interrupts
        self.total = total_iterations(config, len(loader))
        self.epochs = math.ceil(self.total / len(loader))
        self.lr_factor = schedule_factor(
            config.lr_schedule, len(loader), self.epochs, config.milestones, config.lr_gamma,
            warmup_epochs=config.warmup_epochs, warmup_factor=config.warmup_factor,
            warmup_iters=warmup_for(config, self.total), total_iterations=self.total,
            lr_floor=config.lr_floor)
        self.criterion = token_cross_entropy if data.tokens else F.cross_entropy
        self.tokens_per_sample = data.train_x.shape[1] if data.tokens else 1
        self.stats, self.recent = RunningStats(), RunningStats()  # the epoch's; since the eval
        self.metrics: MetricsWriter | None = None
        self.sinks: list[Sink] = []
        self.callback = callback if reporter else None
        self.show = (reporter and config.progress and sys.stderr.isatty()
                     and not os.environ.get("CI"))
        self.resumed = LoopState()
        self.iteration, self.seen, self.train_time = 0, 0, 0.0
        self.test_loss, self.test_acc = float("nan"), 0.0
        # the epoch in progress
        self.epoch, self.batch, self.last_batch = 0, 0, 0
        self.epoch_start, self.window_start, self.evals_s = 0.0, 0.0, 0.0
        self.bar = tqdm(disable=True)
        self.batches: Iterator = iter(())

    def run(self) -> TrainResult | None:
        """The whole run; the result on the reporting rank, None on the others."""
        self.start()
        for epoch in range(self.resumed.epoch, self.epochs):
            self.begin_epoch(epoch)
            while self.batch < self.last_batch:
                self.interrupts.check()
                self.train_segment()
                every = self.config.eval_every  # first, so a checkpoint here holds it
                if every and self.iteration % every == 0 and self.iteration < self.total:
                    self.evaluate_within_epoch()
                stop = self.config.stop_after is not None and \
                    self.iteration >= self.config.stop_after
                every = self.config.checkpoint_every
                if stop or (every and self.iteration % every == 0):
                    self.checkpoint(self.epoch, self.batch,
                                    time.perf_counter() - self.epoch_start)
                if stop:
                    return self.stop()
            self.end_epoch()
        return self.finish()

    def start(self) -> None:
        """Start, or resume where the checkpoint stands; a fresh run writes config.json."""
        self.loader.to(self.method.devices[0])  # batches gathered where the first stage runs
        self.resumed = self.checkpoints.restore(self.method, self.run_dir)
        if not self.checkpoints.resuming and self.run_dir is not None:
            write_run_config(self.run_dir, self.config, self.data, self.model, self.method)
        if self.run_dir is not None:
            self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl")
            self.sinks = open_sinks(self.config.log, self.run_dir)
        self.iteration, self.seen = self.resumed.iteration, self.resumed.seen
        self.recent.load_state(self.resumed.recent)
        self.train_time = self.resumed.train_time

    @property
    def recording(self) -> bool:
        """Whether records are kept (the reporting rank, with an output directory or a
        callback)."""
        return self.metrics is not None or self.callback is not None

    def record(self, kind: str, **values: Any) -> None:
        """Every metrics record of the run passes here, in order: to metrics.jsonl, the
        sinks and the callback."""
        record = plain_record(kind, **values)
        if self.metrics is not None:
            self.metrics.write_record(record)
        for sink in self.sinks:
            sink.write(record)
        if self.callback is not None:
            self.callback(kind, {k: v for k, v in record.items() if k != "kind"})

    def close_records(self) -> None:
        """Close metrics.jsonl and the sinks (the run stops or ends)."""
        if self.metrics:
            self.metrics.close()
        for sink in self.sinks:
            sink.close()

    def begin_epoch(self, epoch: int) -> None:
        """Reset the epoch's statistics (a resumed epoch's from the checkpoint) and clocks."""
        resumed = epoch == self.resumed.epoch
        self.epoch, self.batch = epoch, self.resumed.batch if resumed else 0
        self.stats.reset()
        if resumed:
            self.stats.load_state(self.resumed.stats)
        self.method.train()
        self.epoch_start = time.perf_counter() - (self.resumed.epoch_elapsed if resumed
                                                  else 0.0)
        self.window_start, self.evals_s = time.perf_counter(), 0.0
        self.last_batch = min(len(self.loader), self.total - epoch * len(self.loader))
        self.bar = tqdm(total=self.last_batch, initial=self.batch, disable=not self.show,
                        leave=False,
                        desc=f"{self.config.display_label()} epoch {epoch + 1}/{self.epochs}")
        self.batches = self.loader.epoch(epoch, start=self.batch)

    def train_segment(self) -> None:
        """Feed up to the next checkpoint or evaluation (a clock boundary), so a pipeline
        that runs ahead of its losses holds no minibatch beyond it when it comes."""
        segment = min(self.last_batch - self.batch,
                      until_checkpoint(self.config, self.iteration))
        for loss in self.method.run(itertools.islice(self.batches, segment), self.loss_fn):
            self.interrupts.check()
            self.iteration_done(loss)

    def loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        logits = logits_of(output)  # a HuggingFace model's output holds its logits
        loss = self.criterion(logits, target)
        for s in (self.stats, self.recent):  # no host sync: it may run on a GPU
            s.add(loss.detach(), logits.detach(), target)
        return loss

    def iteration_done(self, loss: Tensor | float | None) -> None:
        """One iteration's loss is in: count it, log it, show progress."""
        self.iteration += 1
        self.batch += 1
        self.bar.update(1)
        every = self.config.log_every
        if self.recording and every and self.iteration % every == 0:
            self.record("iter", iteration=self.iteration, epoch=self.epoch + 1, loss=loss,
                        lr=self.config.lr * self.lr_factor(self.iteration - 1))
        if self.show and self.iteration % 5 == 0:
            elapsed = time.perf_counter() - self.epoch_start - self.evals_s
            rate = self.stats.seen * self.tokens_per_sample / elapsed
            self.bar.set_postfix({"loss": f"{self.stats.loss:.3f}",
                                  "tok/s" if self.data.tokens else "img/s": f"{rate:.0f}"})

    def checkpoint(self, epoch: int, batch: int, elapsed: float) -> None:
        """Save where the loop stands (every rank), to resume at ``epoch``, ``batch``."""
        self.checkpoints.save(self.method, LoopState(
            iteration=self.iteration, epoch=epoch, batch=batch, seen=self.seen,
            train_time=self.train_time, epoch_elapsed=elapsed, stats=self.stats.state(),
            recent=self.recent.state(),
            metrics_lines=self.metrics.lines if self.metrics else 0))

    def evaluate_within_epoch(self) -> None:
        """An --eval-every evaluation; its time is not training time."""
        now = time.perf_counter()
        wall = self.train_time + now - self.epoch_start - self.evals_s
        self.evaluate(now - self.window_start, wall)
        self.evals_s += time.perf_counter() - now
        self.window_start = time.perf_counter()

    def evaluate(self, window_s: float, wall: float) -> tuple[float, float]:
        """Score the held-out set now; record it as an "eval" record of the window since the
        last one (language models, or every --eval-every iterations)."""
        val_loss, val_acc = evaluate(self.method, self.data.test_x, self.data.test_y,
                                     self.config.eval_batch_size)
        recent = self.recent
        recent.load_state(self.method.sum_over_replicas(recent.state()))
        if self.recording:
            samples, per = self.seen + self.stats.seen, self.tokens_per_sample
            values = dict(iteration=self.iteration, epoch=self.epoch + 1,
                          train_loss=recent.loss, val_loss=val_loss, val_acc=val_acc,
                          lr=self.method.lr, wall_time=wall, samples=samples,
                          samples_per_s=recent.seen / max(window_s, 1e-9))
            if self.data.tokens:
                values |= dict(tokens=samples * per,
                               tokens_per_s=recent.seen * per / max(window_s, 1e-9),
                               val_bits_per_byte=bits_per_byte(val_loss))
            self.record("eval", **values)
        recent.reset()
        return val_loss, val_acc

    def end_epoch(self) -> None:
        """Drain at the run's end, score the held-out set, record the epoch, checkpoint."""
        self.bar.close()
        if self.iteration >= self.total:
            self.method.drain()  # the last delayed gradients are learned before the final test
        seconds = time.perf_counter() - self.epoch_start - self.evals_s
        window_s = time.perf_counter() - self.window_start
        self.train_time += seconds
        stats = self.stats
        stats.load_state(self.method.sum_over_replicas(stats.state()))  # every replica's shard
        if self.data.tokens or (self.config.eval_every and self.iteration >= self.total):
            self.test_loss, self.test_acc = self.evaluate(window_s, self.train_time)
        else:
            self.test_loss, self.test_acc = evaluate(self.method, self.data.test_x,
                                                     self.data.test_y,
                                                     self.config.eval_batch_size)
        self.seen += stats.seen
        if self.recording:
            self.record("epoch", epoch=self.epoch + 1, iteration=self.iteration,
                        train_loss=stats.loss, train_acc=stats.accuracy,
                        test_loss=self.test_loss, test_acc=self.test_acc, lr=self.method.lr,
                        images_per_s=stats.seen / seconds, wall_time=self.train_time)
        every = self.config.checkpoint_every_epochs
        if every and (self.epoch + 1) % every == 0 and self.epoch + 1 < self.epochs:
            stats.reset()
            self.checkpoint(self.epoch + 1, 0, 0.0)

    def stop(self) -> TrainResult | None:
        """--stop-after: the checkpoint is saved; end here."""
        self.bar.close()
        self.close_records()
        return stopped_result(self.config, self.iteration, self.run_dir) if self.reporter \
            else None

    def finish(self) -> TrainResult | None:
        """Close the metrics, gather the timeline, save the model; the reporter's result."""
        self.close_records()
        if self.timeline is not None:
            records = gather_to_last(self.timeline.records) if self.world > 1 \
                else [self.timeline.records]
            if self.run_dir is not None:
                self.timeline.records = [r for part in records for r in part]
                self.timeline.write(self.run_dir / "timeline.jsonl")
        save_final_model(self.model, self.method, self.run_dir, self.world)
        return self.result() if self.reporter else None

    def result(self) -> TrainResult:
        config, run_dir, tokens = self.config, self.run_dir, self.data.tokens
        per_s = self.seen / max(self.train_time, 1e-9)
        return TrainResult(
            label=config.display_label(), method=config.method, stages=config.stages,
            test_acc=self.test_acc, test_loss=self.test_loss, train_loss=self.stats.loss,
            train_time_s=self.train_time, images_per_s=per_s,
            run_dir=str(run_dir) if run_dir else None,
            tokens_per_s=per_s * self.tokens_per_sample if tokens else None,
            val_bits_per_byte=bits_per_byte(self.test_loss) if tokens else None,
        )


def write_run_config(run_dir: Path, config: TrainConfig, data: Dataset, model: nn.Module,
                     method: Method) -> None:
    """``config.json``: the settings, and what the run derived from them (label, cut,
    executor, devices, threads, machine)."""
    blocks = len(model) if isinstance(model, nn.Sequential) else None
    saved = config.to_dict() | {"label": config.display_label(), "num_blocks": blocks,
                                "split": method.split, "split_tuning": method.split_tuning,
                                "executor": method.executor_kind,
                                "stage_devices": [str(d) for d in method.devices],
                                "threads_per_stage": stage_threads(config),
                                "machine": machine_info()}
    if data.info:
        saved["data_info"] = data.info
    if config.is_language_model or is_user_model(config.model):
        saved["parameters"] = sum(p.numel() for p in model.parameters())
    (run_dir / "config.json").write_text(json.dumps(saved, indent=2) + "\n")


def given_network(model: nn.Module | Callable[[], nn.Module], seed: int) -> nn.Module:
    """The module handed to :func:`train`, or what its factory builds under ``seed``."""
    if isinstance(model, nn.Module):
        return model
    torch.manual_seed(seed)
    built = model()
    if not isinstance(built, nn.Module):
        raise UsageError(f"train(model=...) got a factory that returned a "
                         f"{type(built).__name__}, not a torch.nn.Module; return the network")
    return built


def total_iterations(config: TrainConfig, steps_per_epoch: int) -> int:
    """The run's length in minibatches: ``--iterations``, else every batch of every epoch."""
    return config.iterations or config.epochs * steps_per_epoch


def stopped_result(config: TrainConfig, iteration: int, run_dir: Path | None) -> TrainResult:
    print(f"stopped after iteration {iteration} (--stop-after); resume with "
          f"--resume {config.out}", file=sys.stderr)
    return TrainResult(label=config.display_label(), method=config.method,
                       stages=config.stages, test_acc=float("nan"), test_loss=float("nan"),
                       train_loss=float("nan"), train_time_s=0.0, images_per_s=0.0,
                       run_dir=str(run_dir) if run_dir else None, stopped=True)



def until_checkpoint(config: TrainConfig, iteration: int) -> int:
    """Iterations from ``iteration`` to the next one that checkpoints, evaluates or stops."""
    ahead = [2**62]
    for every in (config.checkpoint_every, config.eval_every):
        if every:
            ahead.append(every - iteration % every)
    if config.stop_after is not None:
        ahead.append(max(1, config.stop_after - iteration))
    return min(ahead)


