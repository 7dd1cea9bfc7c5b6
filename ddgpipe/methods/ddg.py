"""Decoupled Parallel Backpropagation (Huo, Gu, Yang, Huang; ICML 2018) — the user's view.

Module k of K learns from the gradient of minibatch t - d_k (d_k = K-1-k), backpropagated
through the weights that minibatch's forward used::

    w_k^{t+1} = w_k^t - lr_t * grad_{w_k} loss(x_{t-d_k}; w_0^{t-d_0}, ..., w_{K-1}^{t-d_{K-1}})

so no module waits for the error of the current minibatch to travel back from the output.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from torch import nn
    >>> import ddgpipe
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> pipe = ddgpipe.DDG(model, stages=2, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> losses = [pipe.step(x, y, F.cross_entropy) for _ in range(5)]
    >>> pipe.drain()
    >>> [s.steps for s in pipe.stages]  # every minibatch learned from once by every stage
    [5, 5]
    >>> pipe.model(x).shape
    torch.Size([16, 3])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ddgpipe.core.compensation import CompensationSpec, make_compensation
from ddgpipe.core.compensation.options import check_microbatches
from ddgpipe.core.precision import check_precision
from ddgpipe.core.schedule import DDGSchedule
from ddgpipe.core.stage import OptimizerFactory, SchedulerFactory, Stage
from ddgpipe.core.stash import STASH_MODES
from ddgpipe.core.timeline import Timeline
from ddgpipe.errors import UsageError
from ddgpipe.methods.pipeline import PipelineMethod
from ddgpipe.methods.traced import pipeline_blocks
from ddgpipe.runtime.build import build_stages
from ddgpipe.runtime.placement import Placement

__all__ = ["DDG"]


class DDG(PipelineMethod):
    """Train a network cut into ``stages`` modules with delayed gradients.

    Args:
        model: the network: an ``nn.Sequential`` of blocks, cut at block boundaries, or any
            ``nn.Module`` torch can trace (a HuggingFace causal LM, say), split into blocks
            by :mod:`ddgpipe.trace` (see ``split_points``). It keeps the trained weights (the
            stages hold its own parameters) and is ``pipe.model``.
        stages: K, the number of modules/workers. K = 1 is plain backpropagation.
        optimizer: ``params -> torch.optim.Optimizer``; one optimizer per stage.
        lr_scheduler: ``optimizer -> scheduler``, stepped once per *clock* on every stage so
            all stages share lr_t (count clocks, i.e. minibatches, not epochs).
        stash: ``graph`` (default, exact), ``recompute`` (exact, less memory, one more
            forward) or ``none`` (replay with current weights: approximate).
        sample_input: a batch like the training ones, to profile and time cuts on, and to
            trace a model that is not an ``nn.Sequential`` on (a HuggingFace causal LM needs
            none: it is traced on token ids drawn from its vocabulary).
        split_points: for a traced model, the submodules at which stages 1..K-1 begin, as
            ``model.named_modules()`` spells them (``["model.layers.2"]``); default: a block
            begins at each entry of the model's largest ``nn.ModuleList`` and the balance
            chooses the cut among them.
        grad_shrink: beta; delayed gradients of stage k are scaled by beta**d_k (FDG).
        clip_grad: clip each stage's gradient to this global norm before its step. The
            stages learn from different minibatches, so the norm is per stage; with K = 1
            it is backprop's clip.
        compensation: staleness compensation by name, e.g. ``"sc,lwp"`` or ``["dc"]``
            (see :mod:`ddgpipe.core.compensation`); None is plain DDG.
        compensation_options: its hyperparameters, e.g. ``{"dc_lambda": 1.0}``
            (``ddgpipe.core.compensation.OPTIONS`` lists them with their defaults).
        microbatches: M; each minibatch of B samples is fed as M microbatches of B / M, one
            per clock, and every stage steps once per M clocks with the mean of the
            gradients it summed meanwhile (a gradient is then at most ceil(d_k / M) steps
            stale); the loss returned is the mean of the M microbatches'. 1 is the paper's
            DDG; see ``docs/design.md``, "Microbatched DDG".
        timeline: a :class:`Timeline` to record every op's start and end.
        check_finite: stop with :class:`NonFiniteLossError` when the loss is NaN or inf.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast per stage; fp16 with loss scaling
            that travels with each minibatch's gradient, see :mod:`ddgpipe.core.precision`).
        compile: run every stage's forward and backward through ``torch.compile`` (weights
            as inputs, so new weight versions compile nothing; see :mod:`ddgpipe.core.compiled`).
        placement: where the stages run, a :class:`~ddgpipe.runtime.placement.Placement`;
            each of its fields may also be given as a keyword (overriding it):

            * ``split``: cut points, e.g. ``[4, 8]``; default balances stages by ``balance``.
            * ``balance``: ``params``, ``flops``, ``time`` (blocks profiled on
              ``sample_input``) or ``pipeline`` (the profiled cut and its one-block
              neighbours timed as real pipelines, the fastest kept). Default: with
              ``sample_input`` and K > 1, the cut this machine timed before for the same
              model, schedule, executor and devices (:mod:`ddgpipe.balance.cutcache`), timed
              once if none; ``params`` otherwise.
            * ``executor``: ``threads`` (one thread per stage; the default for K > 1),
              ``reference`` (all stages in turn on this thread: the spec, for debugging) or
              ``processes`` (one rank per stage; chosen by itself under torchrun).
            * ``device``: ``auto``, ``cpu``, ``cuda`` (stages spread over the GPUs) or
              ``cuda:N``; ``devices``: one per stage, e.g. ``["cuda:0", "cuda:1"]``.
            * ``threads``: intra-op threads per stage (default: this machine's cores / K).
            * ``comm``: under the process runtime on GPUs, ``auto`` (nccl) or ``host`` (gloo
              through host memory, for ranks sharing a GPU).
            * ``replicas``: R copies of the pipeline, each on 1/R of every minibatch,
              averaging their gradients before each step (process runtime only, K x R ranks,
              :mod:`ddgpipe.runtime.layout`). Every rank passes the whole minibatch to
              :meth:`step`; the loss it returns is the mean over the replicas. Under
              replicas :meth:`eval`, :meth:`train`, :meth:`sync` and checkpoints are
              collective: every rank calls them, as every rank calls :meth:`step`.
            * ``peer_timeout_s``: how long a stage waits for a peer (threads, processes).
    """

    def __init__(
        self,
        model: nn.Module,
        stages: int,
        optimizer: OptimizerFactory,
        *,
        lr_scheduler: SchedulerFactory | None = None,
        stash: str = "graph",
        sample_input: Tensor | None = None,
        split_points: Sequence[str] | None = None,
        grad_shrink: float = 1.0,
        clip_grad: float | None = None,
        compensation: str | Sequence[str] | None = None,
        compensation_options: Mapping[str, float] | None = None,
        microbatches: int = 1,
        timeline: Timeline | None = None,
        check_finite: bool = True,
        precision: str = "fp32",
        compile: bool = False,
        placement: Placement | None = None,
        **where: Any,
    ):
        check_precision(precision)
        if stash not in STASH_MODES:
            raise UsageError(
                f"unknown stash mode {stash!r}; choose one of {', '.join(STASH_MODES)}"
            )
        if not 0.0 < grad_shrink <= 1.0:
            raise UsageError(f"grad_shrink must be in (0, 1] (got {grad_shrink}); 1 is plain DDG")
        self.stash_mode = stash
        schedule = DDGSchedule(stages, microbatches=microbatches)
        new_compensation = make_compensation(compensation, stash, compensation_options)
        check_microbatches(CompensationSpec.parse(compensation).names, microbatches)
        placed = Placement.of(placement, **where).check()
        _check_microbatched(microbatches, precision, placed.replicas)

        def make_stage(k: int, num_stages: int, module: nn.Module, device: torch.device) -> Stage:
            return Stage(k, num_stages, module, optimizer, lr_scheduler, stash, grad_shrink,
                         clip_grad=clip_grad, compensation=new_compensation(), device=device,
                         precision=precision, compile=compile, microbatches=microbatches)

        blocks = pipeline_blocks(model, stages, sample_input=sample_input,
                                 split_points=split_points)
        executor = build_stages(blocks, schedule, make_stage, placed,
                                sample_input=sample_input, timeline=timeline,
                                stash_precision=(stash, precision))
        self.replicas = placed.replicas
        super().__init__(model, executor, check_finite)


def _check_microbatched(microbatches: int, precision: str, replicas: int) -> None:
    """Refuse what microbatched DDG (M > 1) does not run yet, saying why and what to do."""
    if microbatches == 1:
        return
    if precision == "fp16":
        raise UsageError(f"microbatches ({microbatches}) with fp16 are not supported: the "
                         "microbatches summed into one step may carry different loss scales; "
                         "use bf16 or fp32, or microbatches=1")
    if replicas > 1:
        raise UsageError(f"microbatches ({microbatches}) with replicas ({replicas}) are not "
                         "supported: replicas average each backward's gradients, not a step's "
                         "sum; use replicas=1 or microbatches=1")
