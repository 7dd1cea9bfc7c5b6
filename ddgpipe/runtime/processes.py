"""The process runtime: one stage per process, talking point-to-point over torch.distributed.

Each rank runs its stage through :func:`ddgpipe.core.clock.run_stage_clock`, the very code the
in-process executors run, so after N clocks the weights agree bitwise with the reference;
only communication is added (:mod:`ddgpipe.runtime.p2p`, framed by :mod:`ddgpipe.runtime.wire`).
With R replicas there are K x R processes (:mod:`ddgpipe.runtime.layout`), the copies of a
stage averaging their gradients between B and S (:mod:`ddgpipe.runtime.replicas`). How the
messages overlap the compute, and why: ``docs/design.md``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ddgpipe.core.clock import run_stage_clock
from ddgpipe.core.rng import rng_state, set_rng_state, stage_rng
from ddgpipe.core.schedule import Schedule
from ddgpipe.core.stage import LossFn, Stage
from ddgpipe.core.timeline import Timeline
from ddgpipe.core.values import Value, as_args, map_tensors
from ddgpipe.runtime.executor import Executor, check_input, tensor_of
from ddgpipe.runtime.layout import Layout
from ddgpipe.runtime.p2p import Channel, process_groups
from ddgpipe.runtime.rank_links import RankLinks
from ddgpipe.runtime.replicas import GradientAverager, average_buffers, broadcast_module, sum_over

__all__ = ["ProcessExecutor"]


class ProcessExecutor(Executor):
    """Runs this rank's ``stage`` clock by clock, like the reference.

    ``layout`` says which stage of which replica this rank is, and who its peers are
    (default: one pipeline, rank k = stage k). ``comm`` is ``auto`` (the process group's
    backend: nccl moves GPU tensors directly, gloo moves host tensors) or ``host`` (gloo
    through host memory whatever the device). Under replicas every rank passes the whole
    global minibatch to :meth:`step` and keeps its shard; the loss is the mean over the
    replicas, and :meth:`sync` (collective) makes their BatchNorm statistics agree.
    """

    kind = "processes"

    def __init__(
        self,
        stage: Stage,
        schedule: Schedule,
        timeline: Timeline | None = None,
        timeout_s: float = 300.0,
        comm: str = "auto",
        layout: Layout | None = None,
        *,
        split: list[int] | None = None,
        split_tuning: dict | None = None,
    ):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; use torchrun or the launcher")
        super().__init__([stage], schedule, split=split, split_tuning=split_tuning)
        self.stage = stage
        self.rank = dist.get_rank()
        self.layout = layout or Layout.grid(dist.get_world_size(), 1, self.rank)
        if (stage.index, stage.num_stages) != (self.layout.stage, self.layout.stages) or \
                self.layout.world != dist.get_world_size():
            raise RuntimeError(f"{self.layout.describe()} of {dist.get_world_size()} ranks got "
                               f"stage {stage.index} of {stage.num_stages}")
        self.timeline = timeline
        if stage.device.type == "cuda":  # nccl and the object collectives use this device
            torch.cuda.set_device(stage.device)
        groups = process_groups(comm)
        self.wire = stage.device if dist.get_backend(groups["act"]) == "nccl" \
            else torch.device("cpu")
        record = (lambda a, b: timeline.record_wait(stage.index, a, b)) if timeline else None
        self.channel = Channel(self.rank, self.layout.prev_rank, self.layout.next_rank, groups,
                               self.wire, timedelta(seconds=timeout_s),
                               fp16=stage.precision == "fp16", record_wait=record)
        self._rng_derived = False  # this stage's rng, at its first clock
        self._data_group = self.layout.data_group  # None with one replica
        self._loss_sum: tuple[Any, Tensor] | None = None
        if self._data_group is not None:  # replicas start from replica 0's weights
            broadcast_module(stage.module, self._data_group,
                             self.layout.rank_of(stage.index, replica=0), self.wire)
        if self._data_group is not None and stage.has_parameters:
            stage.averager = GradientAverager(
                stage.stash.params, self._data_group, self.layout.replicas, wire=self.wire,
                timeout_s=timeout_s, describe=self.layout.describe(), record_wait=record)
        self.links = RankLinks(stage, self.channel, self.layout)  # posts the header receive

    @property
    def num_stages(self) -> int:
        return self.layout.stages

    # --- checkpoints ----------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        """This rank's share of a consistent cut between clock ``clock - 1`` and ``clock``.

        Only gradients cross a clock boundary (an activation is consumed in the clock it is
        sent): the one this stage needs at the next clock was sent by stage k+1 during the
        clock just finished, so it is awaited and saved; later ones do not exist yet.
        ``shared`` is the stage's state every replica holds alike, given by replica 0 only
        (None elsewhere); the rest is this rank's own.
        """
        self._check_checkpoints()
        self.sync()  # the replicas' BatchNorm statistics agree before one copy is kept
        grads = []
        # the minibatch the next clock's backward takes
        kept = self.links.keep_gradient(self.clock - self.schedule.delay(self.stage.index))
        if kept is not None:
            grads.append(kept)
        shared = self.stage.state_dict() if self.layout.writes_stage_state else None
        return {"clock": self.clock, "fed": self.fed, "grads": grads,
                "stage_index": self.stage.index, "shared": shared,
                "inflight": self.stage.inflight_state(), "rng_derived": self._rng_derived}

    def load_checkpoint_state(self, state: dict) -> None:
        """Resume from :meth:`checkpoint_state`, with ``shared`` filled in from the stage's
        copy (written by replica 0)."""
        if "shared" in state:
            self.stage.load_state_dict(state["shared"])
            self.stage.load_inflight_state(state["inflight"])
        else:  # format 3: one pipeline, each rank's file held its whole stage
            self.stage.load_pipeline_state(state["stage"])
        self.clock, self.fed = state["clock"], state["fed"]
        self._rng_derived = state.get("rng_derived", self.clock > 0)
        # format 4 and before saved one gradient tensor; now a list of them
        saved = {m: (tuple(g if isinstance(g, list | tuple) else [g]), scale)
                 for _, m, g, scale in state["grads"]}
        self.links.resume(saved)

    # --- clocks -------------------------------------------------------------------------------

    def step(self, x: Value | None, y: Tensor | None, loss_fn: LossFn | None) -> Tensor | None:
        """One clock with a new minibatch; the last stage returns its loss, the others None.

        Under replicas every rank may pass the whole global minibatch: the first stage of
        replica r keeps shard r of ``x``, the last stage shard r of ``y``, and the loss
        returned is the mean over the replicas' shards.
        """
        if self.links.stream_ended:
            raise RuntimeError("this pipeline was drained; build a new one to go on training")
        if self.stage.is_first and x is None:
            raise ValueError("the first stage needs the input x")
        if self.stage.is_last and (y is None or loss_fn is None):
            raise ValueError("the last stage needs the target y and loss_fn")
        xs = self.layout.shard(check_input(x)) if self.stage.is_first else None
        ys = tensor_of(self.layout.shard(y)) if self.stage.is_last and y is not None else None
        self.links.fed = (xs, ys, loss_fn)
        loss = self._run_clock(None)
        self.links.fed = (None, None, None)
        self.fed += 1
        return loss

    def drain(self) -> None:
        """Run the pending backwards and steps, then the stage's finish, then wait for every
        send to be delivered."""
        self.links.end_stream()
        while self.clock < self.schedule.clocks(self.fed):
            self._run_clock(self.fed)
        self.stage.finish()
        self.channel.reap_sends(wait=True)

    def sync(self) -> None:
        """Every call here runs to the end of its clock; under replicas, make the replicas'
        BatchNorm running statistics agree (their mean), a collective call."""
        if self._data_group is not None:
            average_buffers(self.stage.module, self._data_group, self.layout.replicas,
                            self.wire)

    def sum_over_replicas(self, values: list[float]) -> list[float]:
        """``values`` summed over this stage's replicas (collective; as is with one)."""
        if self._data_group is None:
            return values
        return sum_over(values, self._data_group)

    def barrier(self) -> None:
        dist.barrier()

    def gather(self, value: object) -> list:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, value)
        return everyone

    def gather_pipeline(self, value: object) -> list:
        here = self.layout
        everyone = self.gather((here.replica, here.stage, value))
        mine = [(k, v) for r, k, v in everyone if r == here.replica]
        return [v for _, v in sorted(mine, key=lambda pair: pair[0])]

    def _run_clock(self, total: int | None) -> Tensor | None:
        if not self._rng_derived:  # as the in-process executors derive stage k's rng
            self._rng_derived = True
            base = rng_state([self.stage.device])
            set_rng_state(stage_rng(base, self.stage.index))
        actions = self.schedule.actions(self.stage.index, self.clock, total)
        on_loss = self._start_loss_mean if self._data_group is not None else None
        loss = run_stage_clock(self.stage, actions, self.links, timeline=self.timeline,
                               on_loss=on_loss, ends_step=self.schedule.ends_step(self.clock))
        if loss is not None and on_loss is not None:
            loss = self._loss_mean(loss)
        self.channel.reap_sends()
        self.clock += 1
        return loss

    def _start_loss_mean(self, minibatch: int, loss: Tensor) -> None:
        """Start summing the replicas' losses while this clock's backward runs."""
        total = loss.detach().to(self.wire, torch.float64).reshape(1)
        work = dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self._data_group,
                               async_op=True)
        self._loss_sum = (work, total)

    def _loss_mean(self, loss: Tensor) -> Tensor:
        assert self._loss_sum is not None, "the sum started with this clock's loss"
        work, total = self._loss_sum
        self._loss_sum = None
        self.channel.wait(work, "averaging the loss with the other replicas")
        return (total / self.layout.replicas).to(loss.device, loss.dtype).reshape(())

    @torch.no_grad()
    def forward_only(self, x: Value | None) -> Value | None:
        """Inference of one batch through the ranks of one pipeline; its last rank returns the
        output. Under replicas the last replica answers (the one whose last rank reports) and
        the other replicas return None at once."""
        stage, layout = self.stage, self.layout
        if layout.replica != layout.replicas - 1:
            return None
        if stage.is_first:
            inp = map_tensors(check_input(x), lambda t: t.to(stage.device))
        else:
            posted = self.channel.post_header("eval_header", "eval")
            received, _ = self.channel.recv_value(posted, stage.device, tag="eval",
                                                  group="eval")
            assert received is not None, "evaluation sends no end of stream"
            inp = received
        with stage.autocast():
            out = stage.module(*as_args(inp))
        if stage.is_last:
            return out
        self.channel.send_value(out, tags=("eval_header", "eval"), group="eval")
        self.channel.reap_sends(wait=True)
        return None
