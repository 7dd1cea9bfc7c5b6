"""Everything that defines a training run (checked by :mod:`ddgpipe.training.validation`
before any work starts)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ddgpipe.core.compensation import CompensationSpec
from ddgpipe.data.text import CORPORA
from ddgpipe.data.user import is_text_data
from ddgpipe.models import is_language_model
from ddgpipe.runtime.devices import cores_per_stage
from ddgpipe.runtime.placement import Placement

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
