"""Everything that defines a training run, checked before any work starts."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ddgpipe.core.compensation import CompensationSpec
from ddgpipe.core.compensation.options import check_microbatches
from ddgpipe.core.precision import check_precision
from ddgpipe.core.stage import check_clip
from ddgpipe.data.text import CORPORA
from ddgpipe.data.user import is_text_data, is_user_data
from ddgpipe.errors import UsageError
from ddgpipe.models import GPTConfig, is_language_model, is_user_model
from ddgpipe.runtime.devices import cores_per_stage
from ddgpipe.runtime.placement import Placement
from ddgpipe.training.optim import make_optimizer
from ddgpipe.training.recipes import check_scaled_settings
from ddgpipe.training.sinks import check_sinks

__all__ = ["TrainConfig", "TrainResult", "METHODS", "TEXT_DATA", "compensation_options",
           "stage_threads", "flatten", "flat_keys"]

TEXT_DATA = tuple(CORPORA)  # the data sets of token windows

METHODS = ("bp", "ddg", "fr", "dni")


# config.json's key for a placement field, where the two names differ
PLACEMENT_KEYS = {"peer_timeout_s": "timeout_s"}
COMPENSATION_KEYS = ("compensation", "compensation_options")
# the order of config.json's keys (written flat since before the parts existed); keys not
# listed follow, in the tree's order
FLAT_ORDER = (
    "model", "data", "data_dir", "tokenizer", "method", "stages", "replicas", "stash", "split",
    "balance", "grad_shrink", "microbatches", "clip_grad", "compensation",
    "compensation_options", "epochs", "iterations", "batch_size", "eval_batch_size",
    "eval_every", "optimizer", "lr", "momentum", "nesterov", "beta1", "beta2", "weight_decay",
    "lr_schedule", "milestones", "lr_gamma", "warmup_epochs", "warmup_factor", "warmup_iters",
    "context", "width", "heads", "dropout", "tie_embeddings", "seed", "executor", "device",
    "devices", "precision", "compile", "comm", "threads", "log_every", "log", "timeline", "label",
    "out", "progress", "timeout_s", "checkpoint_every", "checkpoint_every_epochs",
    "stop_after", "resume",
)


def default_placement() -> Placement:
    """A run's placement before flags: the device is chosen (``auto``), the rest natural."""
    return Placement(device="auto")


@dataclass
class TrainConfig:
    """Everything that defines a run: settings of its own, and two parts, where the stages run
    (``placement``) and the staleness compensation (``compensation``).

    ``RUN_DIR/config.json`` holds :meth:`to_dict`, one flat key per setting (a part's fields
    under their own names, ``timeout_s`` for ``placement.peer_timeout_s``); :meth:`from_flat`
    and :meth:`from_dict` read that form back.
    """

    model: str = "resnet20"
    data: str = "digits"
    data_dir: str | None = None
    tokenizer: str | None = None  # --data text:PATH: a local HuggingFace tokenizer's folder
    method: str = "bp"
    stages: int = 1
    stash: str = "graph"
    grad_shrink: float = 1.0
    microbatches: int = 1  # each minibatch fed as M microbatches, one step per M clocks
    clip_grad: float | None = None  # per stage: each stage clips its own gradient's norm
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
    precision: str = "fp32"
    compile: bool = False  # torch.compile every stage (backprop: the model)
    log_every: int = 0
    log: list[str] = field(default_factory=list)  # sinks beside metrics.jsonl (training.sinks)
    timeline: bool = False
    label: str | None = None
    out: str | None = None
    progress: bool = True
    checkpoint_every: int = 0
    checkpoint_every_epochs: int = 0
    stop_after: int | None = None
    resume: str | None = None
    overwrite: bool = False  # a non-empty ``out`` is refused unless resumed or this is set
    # where the stages run; threads None: each stage's share of the cores (stage_threads)
    placement: Placement = field(default_factory=default_placement)
    compensation: CompensationSpec = field(default_factory=CompensationSpec)

    def __post_init__(self) -> None:
        if not isinstance(self.compensation, CompensationSpec):  # a name given as text
            self.compensation = CompensationSpec.parse(self.compensation)

    @classmethod
    def from_flat(cls, **settings: Any) -> TrainConfig:
        """A config from flat keywords, as ``config.json`` names them (``executor=``,
        ``compensation="sc,lwp"``, ``compensation_options=``, ``timeout_s=``, ...)."""
        placement_keys = {PLACEMENT_KEYS.get(f.name, f.name): f.name
                          for f in dataclasses.fields(Placement)}
        own = {f.name for f in dataclasses.fields(cls)} - {"placement", "compensation"}
        unknown = sorted(set(settings) - own - set(placement_keys) - set(COMPENSATION_KEYS))
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}; the settings are "
                            f"{', '.join(sorted(own | set(placement_keys)))}, compensation "
                            "and compensation_options")
        placement = dataclasses.replace(default_placement(), **{
            placement_keys[k]: v for k, v in settings.items() if k in placement_keys})
        compensation = CompensationSpec.parse(settings.get("compensation"),
                                              settings.get("compensation_options"))
        return cls(placement=placement, compensation=compensation,
                   **{k: v for k, v in settings.items() if k in own})

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> TrainConfig:
        """A config from a ``config.json`` (flat, or nested as ``dataclasses.asdict`` gives
        it); the keys a run adds to what it was given (``num_blocks``, ``machine``, ...) are
        skipped."""
        flat = flatten(saved)
        return cls.from_flat(**{k: v for k, v in flat.items() if k in flat_keys()})

    def to_dict(self) -> dict[str, Any]:
        """The flat form ``config.json`` records (JSON values, copied)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("placement", "compensation")}
        flat |= {PLACEMENT_KEYS.get(f.name, f.name): getattr(self.placement, f.name)
                 for f in dataclasses.fields(self.placement)}
        flat |= {"compensation": self.compensation.text,
                 "compensation_options": dict(self.compensation.options) or None}
        order = {key: i for i, key in enumerate(FLAT_ORDER)}
        keys = sorted(flat, key=lambda k: order.get(k, len(order)))
        return copy.deepcopy({k: flat[k] for k in keys})

    @property
    def is_language_model(self) -> bool:
        """Whether the model is the registry's GPT (``gpt-L``, shaped by --width, ...)."""
        return is_language_model(self.model)

    @property
    def text_data(self) -> bool:
        """Whether the data are windows of token ids (a corpus, or ``text:PATH``)."""
        return self.data in TEXT_DATA or is_text_data(self.data)

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

    def stage_placement(self) -> Placement:
        """Where the stages run, as ``DDG(..., placement=)`` takes it: the threads resolved."""
        return dataclasses.replace(self.placement, threads=stage_threads(self))

    def display_label(self) -> str:
        if self.label:
            return self.label
        if self.method == "bp":
            return "BP"
        label = f"{self.method.upper()} K={self.stages}"
        if self.placement.replicas > 1:
            label += f" x R={self.placement.replicas}"
        if self.microbatches > 1:
            label += f" M={self.microbatches}"
        text = self.compensation.text
        return f"{label} {text}" if text else label

    def validate(self) -> None:
        """Refuse settings that cannot run, each naming its flag and the fix, before any
        work starts."""
        self._validate_shape()
        self._validate_placement()
        check_precision(self.precision)
        if self.compile and self.method == "dni":
            raise UsageError("--compile runs backprop, DDG and FR stages; DNI's synthetic-"
                             "gradient modules run eager: drop --compile")
        if self.placement.devices is not None and self.method == "bp" and \
                len(self.placement.devices) != 1:
            raise UsageError("--devices names one device per stage; bp has one stage: use "
                             "--device")
        self._validate_optimisation()
        self._validate_length()
        self._validate_model_and_data()
        if self.warmup_epochs < 0 or not 0 < self.warmup_factor <= 1:
            raise UsageError(f"--warmup-epochs must be >= 0 and --warmup-factor in (0, 1] "
                             f"(got {self.warmup_epochs}, {self.warmup_factor})")
        self._validate_checkpoints()

    def _validate_shape(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size),
                            ("--eval-batch-size", self.eval_batch_size),
                            ("--stages", self.stages)):
            if value < 1:
                raise UsageError(f"{flag} must be >= 1 (got {value})")
        if self.method == "bp" and self.stages != 1:
            raise UsageError(
                f"--method bp runs the whole network as one module (got --stages {self.stages}); "
                "use --method ddg or dni to cut it into stages"
            )

    def _validate_placement(self) -> None:
        try:
            self.placement.check()
        except UsageError as e:  # the same check as the API's, worded with the flags
            raise UsageError(flag_worded(str(e))) from None
        if self.placement.replicas > 1:
            self._validate_replicas()
        elif self.placement.executor == "processes" and (self.method == "bp" or self.stages < 2):
            raise UsageError("--executor processes runs one process per stage: use it with "
                             "--method ddg, fr or dni and --stages 2 or more (or with "
                             "--replicas 2 or more)")

    def _validate_optimisation(self) -> None:
        if self.method == "fr" and self.stash != "graph":
            raise UsageError("--method fr always replays with current weights (stash none); "
                             "drop --stash, or use --method ddg --stash ...")
        if self.compensation and self.method not in ("ddg", "fr"):
            raise UsageError(
                f"--compensation corrects the delayed gradients of --method ddg or fr; "
                f"--method {self.method} has none to correct (bp has no delay, dni learns from "
                "synthetic gradients): drop --compensation and its options, or use --method ddg"
            )
        probe = make_optimizer(self.optimizer, self.lr, self.momentum, self.nesterov,
                               self.weight_decay, betas=self.betas)  # bad settings fail here
        if self.compensation:  # stash mode and optimizer fail here, before workers
            self.compensation.with_defaults(pipemare_anneal=1).check(
                "none" if self.method == "fr" else self.stash,
                probe([nn.Parameter(torch.zeros(1))]))
        check_clip(self.clip_grad)
        self._validate_microbatches()

    def _validate_microbatches(self) -> None:
        m = self.microbatches
        if m < 1:
            raise UsageError(f"--microbatches must be >= 1 (got {m}); 1 feeds each minibatch "
                             "whole")
        if m == 1:
            return
        if self.method not in ("ddg", "fr"):
            raise UsageError(f"--microbatches {m} feeds the minibatches of --method ddg or fr "
                             f"as microbatches, one per clock; --method {self.method} "
                             + ("computes the whole minibatch at once" if self.method == "bp"
                                else "steps every clock") + ": drop --microbatches")
        if self.batch_size % m:
            raise UsageError(f"--batch-size {self.batch_size} does not split into "
                             f"--microbatches {m} equal microbatches; choose a batch size that "
                             f"is a multiple of {m}")
        if self.placement.replicas > 1:
            raise UsageError(f"--microbatches {m} with --replicas {self.placement.replicas} "
                             "is not supported (replicas average each backward's gradients, "
                             "not a step's sum): drop one of them")
        if self.precision == "fp16":
            raise UsageError(f"--microbatches {m} with --precision fp16 is not supported (a "
                             "step's microbatches may carry different loss scales): use bf16")
        check_microbatches(self.compensation.names, m)

    def _validate_length(self) -> None:
        if self.iterations is not None and self.iterations < 1:
            raise UsageError(f"--iterations must be >= 1 (got {self.iterations})")
        if self.eval_every < 0 or self.warmup_iters < 0:
            raise UsageError(f"--eval-every and --warmup-iters must be >= 0 (got "
                             f"{self.eval_every}, {self.warmup_iters})")
        check_scaled_settings(self)

    def _validate_checkpoints(self) -> None:
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
        check_sinks(self.log)

    def _validate_model_and_data(self) -> None:
        self._validate_user_model_and_data()
        text = self.text_data
        if self.is_language_model and not text:
            raise UsageError(f"--model {self.model} is a language model of token windows: use it "
                             f"with --data {' or '.join(TEXT_DATA)} or text:PATH")
        if text and not (self.is_language_model or is_user_model(self.model)):
            kind = "byte tokens" if self.tokenizer is None else "tokens"
            raise UsageError(f"--data {self.data} holds windows of {kind} for a language "
                             "model: use it with --model gpt-L (e.g. --model gpt-8), hf:DIR "
                             "or FILE.py:FACTORY")
        lm_only = {"--width": self.width, "--heads": self.heads, "--dropout": self.dropout,
                   "--tie-embeddings": self.tie_embeddings or None}
        given = [flag for flag, value in lm_only.items() if value is not None]
        if given and not self.is_language_model:
            raise UsageError(f"{', '.join(given)} shape a language model (--model gpt-L); "
                             f"--model {self.model} has no such setting: drop them")
        if self.tie_embeddings and self.method == "dni" and self.stages > 1:
            raise UsageError(
                "--tie-embeddings shares the token embedding (in the first stage) with the "
                "output projection (in the last), and DNI has no rule for a parameter used by "
                f"two stages; with --stages {self.stages} drop --tie-embeddings (untied is the "
                "default), or train it with --method ddg or bp")
        if self.is_language_model:
            width = self.width or GPTConfig.width
            GPTConfig(width=width, heads=self.heads or GPTConfig.heads, context=self.context,
                      dropout=GPTConfig.dropout if self.dropout is None else self.dropout
                      ).check()

    def _validate_user_model_and_data(self) -> None:
        """The checks a user's model or data get before any file is read."""
        if self.tokenizer is not None and not is_text_data(self.data):
            raise UsageError(f"--tokenizer turns a text file into tokens; --data {self.data} is "
                             "not one: pass --data text:PATH, or drop --tokenizer")
        if self.model.startswith("hf:") and not self.text_data:
            raise UsageError(f"--model {self.model} is a causal language model of token ids: "
                             f"train it on --data text:PATH (or {' or '.join(TEXT_DATA)})")
        if is_user_data(self.data) and self.data_dir is not None:
            raise UsageError(f"--data {self.data} names its own file; drop --data-dir")

    def _validate_replicas(self) -> None:
        r, executor, devices = (self.placement.replicas, self.placement.executor,
                                self.placement.devices)
        if self.method not in ("ddg", "fr"):
            fix = ("--method ddg --stages 1 --replicas R is data-parallel backprop"
                   if self.method == "bp" else "drop --replicas")
            raise UsageError(f"--replicas averages the gradients of --method ddg or fr between "
                             f"their backward and their step; --method {self.method} has no "
                             f"replicas: {fix}")
        if executor in ("reference", "threads"):
            raise UsageError(f"--replicas {r} runs one process per stage and replica; "
                             f"--executor {executor} runs one process: use --executor "
                             "processes (or torchrun)")
        if self.batch_size % r:
            fit = self.batch_size - self.batch_size % r or r
            raise UsageError(
                f"--batch-size {self.batch_size} is the global minibatch, split into {r} equal "
                f"shards (one per replica), but {self.batch_size} is not divisible by {r}; "
                f"pass a multiple of {r}, e.g. --batch-size {fit}")
        if devices is not None and len(devices) != self.stages * r:
            raise UsageError(f"--devices names {len(devices)} device(s), but with replicas "
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
    return dict(config.compensation.with_defaults(pipemare_anneal=steps_per_epoch).options)


def stage_threads(config: TrainConfig) -> int:
    """Intra-op threads each stage computes with: ``--threads``, or its share of the cores.

    Every in-process executor gives each stage the same count (the threaded one on each stage
    thread, the reference on its one thread), so their numbers agree.
    """
    if config.placement.threads:
        return config.placement.threads
    return cores_per_stage(1 if config.method == "bp" else config.stages)


def flat_keys() -> tuple[str, ...]:
    """Every key of the flat form (``config.json``, :meth:`TrainConfig.from_flat`)."""
    return tuple(TrainConfig().to_dict())


def flatten(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict in the flat form: nested parts (``placement: {...}``, ``compensation:
    {names, options}``) become their flat keys; flat keys pass as they are."""
    flat = dict(saved)
    placement = flat.pop("placement", None)
    if isinstance(placement, Mapping):
        flat |= {PLACEMENT_KEYS.get(str(k), str(k)): v for k, v in placement.items()}
    compensation = flat.get("compensation")
    if isinstance(compensation, Mapping):
        names = compensation.get("names") or ()
        flat["compensation"] = ",".join(names) or None
        flat["compensation_options"] = dict(compensation.get("options") or {}) or None
    return flat


# Placement.check's words for a field -> the flag that sets it on the command line
FLAG_WORDS = (("threads must", "--threads must"), ("replicas must", "--replicas must"),
              ("the peer timeout must", "--timeout must"), ("unknown comm", "unknown --comm"))


def flag_worded(message: str) -> str:
    """``Placement.check``'s message, naming the command line's flag for its field."""
    for words, flag in FLAG_WORDS:
        if message.startswith(words):
            return flag + message[len(words):]
    return message
