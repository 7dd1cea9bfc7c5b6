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
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ddgpipe.core.timeline import Timeline
from ddgpipe.data import BatchLoader, Dataset, load_dataset
from ddgpipe.losses import token_cross_entropy
from ddgpipe.machine import machine_info
from ddgpipe.methods import Method
from ddgpipe.models import build_model
from ddgpipe.runtime.allocator import tune_allocator
from ddgpipe.runtime.devices import cores_per_stage, rank_device
from ddgpipe.runtime.placement import world_size
from ddgpipe.training.assemble import build_method, check_model_accepts
from ddgpipe.training.checkpoints import Checkpoints, LoopState
from ddgpipe.training.config import TrainConfig, TrainResult, stage_threads
from ddgpipe.training.evaluation import bits_per_byte, evaluate
from ddgpipe.training.interrupts import InterruptGuard
from ddgpipe.training.metrics import MetricsWriter, RunningStats
from ddgpipe.training.optim import schedule_factor
from ddgpipe.training.recipes import warmup_for
from ddgpipe.training.run_dir import gather_to_last, prepare_out_dir, save_final_model

__all__ = ["train", "train_worker"]


def train_worker(rank: int, world: int, config: TrainConfig) -> TrainResult | None:
    """Entry point of one spawned stage process (``--executor processes``)."""
    return train(config)


def train(config: TrainConfig, dataset: Dataset | None = None, *,
          tune_malloc: bool = True) -> TrainResult | None:
    """Train one run as ``config`` says; metrics go to ``config.out`` when given.

    Under torch.distributed (one process per stage and replica) every rank calls this; the
    last rank writes the metrics and returns the result, the others return None.

    A run owns its process: it sets torch's intra-op thread count to each stage's share of
    the cores, catches Ctrl-C (over Python's default handler only), and, with
    ``tune_malloc``, makes glibc's malloc keep the memory it frees, so steps stop
    page-faulting (:func:`ddgpipe.runtime.allocator.tune_allocator` says why).
    """
    config.validate()
    if tune_malloc:
        tune_allocator()
    rank, world = (dist.get_rank(), dist.get_world_size()) if world_size() > 1 else (0, 1)
    if world > 1:  # one stage per process: each takes its share of this node's cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(config.threads or cores_per_stage(local))
        here = rank_device(config.device, config.devices)
        if here.type == "cuda":
            torch.cuda.set_device(here)
    else:  # every stage's share of the cores, on this thread too (the reference, evaluation)
        torch.set_num_threads(stage_threads(config))
    # The last stage has the loss: it writes the metrics and shows progress.
    reporter = rank == world - 1
    checkpoints = Checkpoints(config, rank, world)  # a run to resume from is checked first
    data = dataset or load_dataset(config.data, config.data_dir, context=config.context)
    run_dir = prepare_out_dir(config.out, keep=checkpoints.resuming) if reporter else None

    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes=data.num_classes, input_shape=data.input_shape,
                        **config.model_options())
    check_model_accepts(model, data, config)
    loader = BatchLoader(data.train_x, data.train_y, config.batch_size, shuffle=True,
                         seed=config.seed, augment=data.augment, name=data.name)
    timeline = Timeline(rank=rank if world > 1 else None) if config.timeline else None
    method = build_method(config, model, len(loader), timeline,
                          sample_input=data.train_x[: config.batch_size],
                          total_iterations=total_iterations(config, len(loader)))
    try:
        with InterruptGuard() as interrupts:
            return _train_loop(config, data, model, loader, method, timeline, checkpoints,
                               run_dir, world, reporter, interrupts)
    finally:
        method.close()  # never leave a stage thread behind, whatever happened


def _train_loop(config: TrainConfig, data: Dataset, model: nn.Sequential, loader: BatchLoader,
                method: Method, timeline: Timeline | None, checkpoints: Checkpoints,
                run_dir: Path | None, world: int, reporter: bool,
                interrupts: InterruptGuard) -> TrainResult | None:
    # Batches are gathered (and augmented) where the first stage computes.
    loader.to(method.devices[0])
    loop = checkpoints.restore(method, run_dir)
    if not checkpoints.resuming and run_dir is not None:
        saved = dataclasses.asdict(config) | {"label": config.display_label(),
                                              "num_blocks": len(model), "split": method.split,
                                              "split_tuning": method.split_tuning,
                                              "executor": method.executor_kind,
                                              "stage_devices": [str(d) for d in
                                                                method.devices],
                                              "threads_per_stage": stage_threads(config),
                                              "machine": machine_info()}
        if data.info:
            saved["data_info"] = data.info
        if config.is_language_model:
            saved["parameters"] = sum(p.numel() for p in model.parameters())
        (run_dir / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    metrics = MetricsWriter(run_dir / "metrics.jsonl") if run_dir is not None else None

    stats, recent = RunningStats(), RunningStats()  # this epoch's, and since the last eval
    criterion = token_cross_entropy if data.tokens else F.cross_entropy
    tokens_per_sample = data.train_x.shape[1] if data.tokens else 1

    def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
        loss = criterion(logits, target)
        for s in (stats, recent):  # no host sync: it may run on a GPU
            s.add(loss.detach(), logits.detach(), target)
        return loss

    def checkpoint(epoch: int, batch: int, elapsed: float) -> None:
        checkpoints.save(method, LoopState(
            iteration=iteration, epoch=epoch, batch=batch, seen=seen, train_time=train_time,
            epoch_elapsed=elapsed, stats=stats.state(),
            metrics_lines=metrics.lines if metrics else 0))

    total = total_iterations(config, len(loader))
    epochs = math.ceil(total / len(loader))
    factor = schedule_factor(config.lr_schedule, len(loader), epochs, config.milestones,
                             config.lr_gamma, warmup_epochs=config.warmup_epochs,
                             warmup_factor=config.warmup_factor,
                             warmup_iters=warmup_for(config, total), total_iterations=total,
                             lr_floor=config.lr_floor)

    def lr_at(iteration: int) -> float:  # every stage's lr at a clock: the schedule's
        return config.lr * factor(iteration)

    def held_out(epoch: int, window_s: float, wall: float) -> tuple[float, float]:
        """Score the held-out set now; record it as an "eval" record of the window since the
        last one (language models, or every --eval-every iterations)."""
        val_loss, val_acc = evaluate(method, data.test_x, data.test_y, config.eval_batch_size)
        recent.load_state(method.sum_over_replicas(recent.state()))
        if metrics:
            record = dict(iteration=iteration, epoch=epoch + 1, train_loss=recent.loss,
                          val_loss=val_loss, val_acc=val_acc, lr=method.lr, wall_time=wall,
                          samples=seen_so_far(), samples_per_s=recent.seen / max(window_s, 1e-9))
            if data.tokens:
                record |= dict(tokens=seen_so_far() * tokens_per_sample,
                               tokens_per_s=recent.seen * tokens_per_sample / max(window_s, 1e-9),
                               val_bits_per_byte=bits_per_byte(val_loss))
            metrics.write("eval", **record)
        recent.reset()
        return val_loss, val_acc

    test_loss, test_acc = float("nan"), 0.0
    iteration, seen, train_time = loop.iteration, loop.seen, loop.train_time
    seen_so_far = lambda: seen + stats.seen  # noqa: E731
    show = reporter and config.progress and sys.stderr.isatty() and not os.environ.get("CI")
    for epoch in range(loop.epoch, epochs):
        first_batch = loop.batch if epoch == loop.epoch else 0
        stats.reset()
        if epoch == loop.epoch:
            stats.load_state(loop.stats)
        method.train()
        start = time.perf_counter() - (loop.epoch_elapsed if epoch == loop.epoch else 0.0)
        window_start, evals_s = time.perf_counter(), 0.0
        last_batch = min(len(loader), total - epoch * len(loader))
        bar = tqdm(total=last_batch, initial=first_batch, disable=not show, leave=False,
                   desc=f"{config.display_label()} epoch {epoch + 1}/{epochs}")
        batches = loader.epoch(epoch, start=first_batch)
        batch = first_batch
        while batch < last_batch:
            interrupts.check()
            # Feed up to the next checkpoint or evaluation (a clock boundary), so a pipeline
            # that runs ahead of its losses holds no minibatch beyond it when it comes.
            segment = min(last_batch - batch, until_checkpoint(config, iteration))
            for loss in method.run(itertools.islice(batches, segment), loss_fn):
                interrupts.check()
                iteration += 1
                batch += 1
                bar.update(1)
                if metrics and config.log_every and iteration % config.log_every == 0:
                    metrics.write("iter", iteration=iteration, epoch=epoch + 1, loss=loss,
                                  lr=lr_at(iteration - 1))
                if show and iteration % 5 == 0:
                    rate = stats.seen * tokens_per_sample / (time.perf_counter() - start - evals_s)
                    bar.set_postfix({"loss": f"{stats.loss:.3f}",
                                     "tok/s" if data.tokens else "img/s": f"{rate:.0f}"})
            stop = config.stop_after is not None and iteration >= config.stop_after
            if stop or (config.checkpoint_every and iteration % config.checkpoint_every == 0):
                checkpoint(epoch, batch, time.perf_counter() - start)
            if stop:
                bar.close()
                if metrics:
                    metrics.close()
                return stopped_result(config, iteration, run_dir) if reporter else None
            if config.eval_every and iteration % config.eval_every == 0 and iteration < total:
                now = time.perf_counter()
                wall = train_time + now - start - evals_s
                held_out(epoch, now - window_start, wall)
                evals_s += time.perf_counter() - now
                window_start = time.perf_counter()
        bar.close()
        if iteration >= total:
            method.drain()  # the last delayed gradients are learned before the final test
        seconds = time.perf_counter() - start - evals_s
        window_s = time.perf_counter() - window_start
        train_time += seconds
        stats.load_state(method.sum_over_replicas(stats.state()))  # every replica's shard
        if data.tokens or (config.eval_every and iteration >= total):
            test_loss, test_acc = held_out(epoch, window_s, train_time)
        else:
            test_loss, test_acc = evaluate(method, data.test_x, data.test_y,
                                           config.eval_batch_size)
        seen += stats.seen
        if metrics:
            metrics.write(
                "epoch", epoch=epoch + 1, iteration=iteration, train_loss=stats.loss,
                train_acc=stats.accuracy, test_loss=test_loss, test_acc=test_acc, lr=method.lr,
                images_per_s=stats.seen / seconds, wall_time=train_time,
            )
        every = config.checkpoint_every_epochs
        if every and (epoch + 1) % every == 0 and epoch + 1 < epochs:
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
    per_s = seen / max(train_time, 1e-9)
    return TrainResult(
        label=config.display_label(), method=config.method, stages=config.stages,
        test_acc=test_acc, test_loss=test_loss, train_loss=stats.loss,
        train_time_s=train_time, images_per_s=per_s, run_dir=str(run_dir) if run_dir else None,
        tokens_per_s=per_s * tokens_per_sample if data.tokens else None,
        val_bits_per_byte=bits_per_byte(test_loss) if data.tokens else None,
    )


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


