"""Everything that defines a training run, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ddgpipe.core.compensation import make_compensation, parse_compensation
from ddgpipe.core.precision import check_precision
from ddgpipe.core.stage import check_clip
from ddgpipe.data.text import CORPORA
from ddgpipe.errors import UsageError
from ddgpipe.models import GPTConfig, is_language_model
from ddgpipe.runtime.devices import cores_per_stage
from ddgpipe.runtime.placement import COMMS, EXECUTORS, Placement
from ddgpipe.training.optim import make_optimizer
from ddgpipe.training.recipes import check_scaled_settings

__all__ = ["TrainConfig", "TrainResult", "METHODS", "TEXT_DATA", "compensation_options",
           "stage_threads"]

TEXT_DATA = tuple(CORPORA)  # the data sets of token windows

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
    clip_grad: float | None = None  # per stage: each stage clips its own gradient's norm
    compensation: str | None = None  # e.g. "sc,lwp": ddgpipe.core.compensation
    compensation_options: dict | None = None  # e.g. {"dc_lambda": 1.0}
    epochs: int = 15
    iterations: int | None = None  # the run's length in minibatches, instead of epochs
    batch_size: int = 64
    eval_batch_size: int = 512
    eval_every: int = 0  # evaluate on the held-out set every N iterations (0: per epoch)
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    beta1: float | None = None  # adamw, nadam, muon (None: torch's 0.9, 0.999)
    beta2: float | None = None
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    warmup_factor: float = 0.1
    warmup_iters: int = 0  # linear warm-up from 0 over N iterations, then the schedule
    warmup_share: float = 0.0  # or over this fraction of the run (ddgpipe.training.recipes)
    lr_floor: float = 0.0  # cosine ends at lr_floor * lr
    nadam_horizon: int | None = None  # NAdam's momentum_decay = 0.004 * N / iterations
    context: int = 128  # language models: tokens per window
    width: int | None = None  # gpt-L: None is GPTConfig's
    heads: int | None = None
    dropout: float | None = None
    tie_embeddings: bool = False
    seed: int = 0
    executor: str | None = None  # reference | threads | processes; None: the natural one
    device: str = "auto"
    devices: list[str] | None = None
    precision: str = "fp32"
    compile: bool = False  # torch.compile every stage (backprop: the model)
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

    @property
    def is_language_model(self) -> bool:
        return is_language_model(self.model)

    def model_options(self) -> dict:
        """What ``build_model`` takes beyond the data's shape: a GPT's width, heads, ..."""
        if not self.is_language_model:
            return {}
        given = {"width": self.width, "heads": self.heads, "dropout": self.dropout,
                 "context": self.context, "tie_embeddings": self.tie_embeddings}
        return {k: v for k, v in given.items() if v is not None}

    @property
    def betas(self) -> tuple[float, float] | None:
        if self.beta1 is None and self.beta2 is None:
            return None
        return (0.9 if self.beta1 is None else self.beta1,
                0.999 if self.beta2 is None else self.beta2)

    def placement(self) -> Placement:
        """Where the stages run, as ``DDG(..., placement=)`` takes it."""
        return Placement(split=self.split, balance=self.balance, executor=self.executor,
                         device=self.device, devices=self.devices, threads=stage_threads(self),
                         comm=self.comm, replicas=self.replicas, peer_timeout_s=self.timeout_s)

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
        if self.compile and self.method == "dni":
            raise UsageError("--compile runs backprop, DDG and FR stages; DNI's synthetic-"
                             "gradient modules run eager: drop --compile")
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
        probe = make_optimizer(self.optimizer, self.lr, self.momentum, self.nesterov,
                               self.weight_decay, betas=self.betas)  # bad settings fail here
        if compensated:  # names, options, stash mode and optimizer fail here, before workers
            make_compensation(self.compensation, "none" if self.method == "fr" else self.stash,
                              compensation_options(self, steps_per_epoch=1),
                              probe([nn.Parameter(torch.zeros(1))]))
        check_clip(self.clip_grad)
        if self.iterations is not None and self.iterations < 1:
            raise UsageError(f"--iterations must be >= 1 (got {self.iterations})")
        if self.eval_every < 0 or self.warmup_iters < 0:
            raise UsageError(f"--eval-every and --warmup-iters must be >= 0 (got "
                             f"{self.eval_every}, {self.warmup_iters})")
        self._validate_model_and_data()
        check_scaled_settings(self)
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

    def _validate_model_and_data(self) -> None:
        text = self.data in TEXT_DATA
        if self.is_language_model and not text:
            raise UsageError(f"--model {self.model} is a language model of token windows: use it "
                             f"with --data {' or '.join(TEXT_DATA)}")
        if text and not self.is_language_model:
            raise UsageError(f"--data {self.data} holds windows of byte tokens for a language "
                             "model: use it with --model gpt-L, e.g. --model gpt-8")
        lm_only = {"--width": self.width, "--heads": self.heads, "--dropout": self.dropout,
                   "--tie-embeddings": self.tie_embeddings or None}
        given = [flag for flag, value in lm_only.items() if value is not None]
        if given and not self.is_language_model:
            raise UsageError(f"{', '.join(given)} shape a language model (--model gpt-L); "
                             f"--model {self.model} has no such setting: drop them")
        if self.tie_embeddings and self.method != "bp" and self.stages > 1:
            raise UsageError(
                "--tie-embeddings shares the token embedding (in the first stage) with the "
                "output projection (in the last), and one tensor in two stages would get two "
                f"updates at two different delays; with --stages {self.stages} drop "
                "--tie-embeddings (untied is the default), or train it with --method bp")
        if self.is_language_model:
            width = self.width or GPTConfig.width
            GPTConfig(width=width, heads=self.heads or GPTConfig.heads, context=self.context,
                      dropout=GPTConfig.dropout if self.dropout is None else self.dropout
                      ).check()

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
    tokens_per_s: float | None = None  # language models
    val_bits_per_byte: float | None = None

def compensation_options(config: TrainConfig, steps_per_epoch: int) -> dict:
    """The compensation's options; PipeMare's anneal period defaults to one epoch here."""
    options = dict(config.compensation_options or {})
    names = parse_compensation(config.compensation)
    if {"pipemare", "pipemare-lr"} & set(names) and options.get("pipemare_anneal") is None:
        options["pipemare_anneal"] = steps_per_epoch
    return options



def stage_threads(config: TrainConfig) -> int:
    """Intra-op threads each stage computes with: ``--threads``, or its share of the cores.

    Every in-process executor gives each stage the same count (the threaded one on each stage
    thread, the reference on its one thread), so their numbers agree.
    """
    if config.threads:
        return config.threads
    return cores_per_stage(1 if config.method == "bp" else config.stages)
