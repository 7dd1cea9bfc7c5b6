"""The checks a :class:`~ddgpipe.training.config.TrainConfig` passes before any work starts:
each refusal names its flag and the fix."""

from __future__ import annotations

import torch
from torch import nn

from ddgpipe.core.compensation.options import check_microbatches
from ddgpipe.core.precision import check_precision
from ddgpipe.core.stage import check_clip
from ddgpipe.data.user import is_text_data, is_user_data
from ddgpipe.errors import UsageError
from ddgpipe.models import GPTConfig, is_user_model
from ddgpipe.training.config import METHODS, TEXT_DATA, TrainConfig
from ddgpipe.training.optim import make_optimizer
from ddgpipe.training.recipes import check_scaled_settings
from ddgpipe.training.sinks import check_sinks

__all__ = ["check_config", "flag_worded"]


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot run, each naming its flag and the fix, before any
    work starts."""
    _validate_shape(config)
    _validate_placement(config)
    check_precision(config.precision)
    if config.compile and config.method == "dni":
        raise UsageError("--compile runs backprop, DDG and FR stages; DNI's synthetic-"
                         "gradient modules run eager: drop --compile")
    if config.placement.devices is not None and config.method == "bp" and \
            len(config.placement.devices) != 1:
        raise UsageError("--devices names one device per stage; bp has one stage: use "
                         "--device")
    _validate_optimisation(config)
    _validate_length(config)
    _validate_model_and_data(config)
    if config.warmup_epochs < 0 or not 0 < config.warmup_factor <= 1:
        raise UsageError(f"--warmup-epochs must be >= 0 and --warmup-factor in (0, 1] "
                         f"(got {config.warmup_epochs}, {config.warmup_factor})")
    _validate_checkpoints(config)


def _validate_shape(config: TrainConfig) -> None:
    if config.method not in METHODS:
        raise UsageError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    for flag, value in (("--epochs", config.epochs), ("--batch-size", config.batch_size),
                        ("--eval-batch-size", config.eval_batch_size),
                        ("--stages", config.stages)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1 (got {value})")
    if config.method == "bp" and config.stages != 1:
        raise UsageError(
            f"--method bp runs the whole network as one module (got --stages {config.stages}); "
            "use --method ddg or dni to cut it into stages"
        )


def _validate_placement(config: TrainConfig) -> None:
    try:
        config.placement.check()
    except UsageError as e:  # the same check as the API's, worded with the flags
        raise UsageError(flag_worded(str(e))) from None
    if config.placement.replicas > 1:
        _validate_replicas(config)
    elif config.placement.executor == "processes" and (config.method == "bp" or config.stages < 2):
        raise UsageError("--executor processes runs one process per stage: use it with "
                         "--method ddg, fr or dni and --stages 2 or more (or with "
                         "--replicas 2 or more)")


def _validate_optimisation(config: TrainConfig) -> None:
    if config.method == "fr" and config.stash != "graph":
        raise UsageError("--method fr always replays with current weights (stash none); "
                         "drop --stash, or use --method ddg --stash ...")
    if config.compensation and config.method not in ("ddg", "fr"):
        raise UsageError(
            f"--compensation corrects the delayed gradients of --method ddg or fr; "
            f"--method {config.method} has none to correct (bp has no delay, dni learns from "
            "synthetic gradients): drop --compensation and its options, or use --method ddg"
        )
    probe = make_optimizer(config.optimizer, config.lr, config.momentum, config.nesterov,
                           config.weight_decay, betas=config.betas)  # bad settings fail here
    if config.compensation:  # stash mode and optimizer fail here, before workers
        config.compensation.with_defaults(pipemare_anneal=1).check(
            "none" if config.method == "fr" else config.stash,
            probe([nn.Parameter(torch.zeros(1))]))
    check_clip(config.clip_grad)
    _validate_microbatches(config)


def _validate_microbatches(config: TrainConfig) -> None:
    m = config.microbatches
    if m < 1:
        raise UsageError(f"--microbatches must be >= 1 (got {m}); 1 feeds each minibatch "
                         "whole")
    if m == 1:
        return
    if config.method not in ("ddg", "fr"):
        raise UsageError(f"--microbatches {m} feeds the minibatches of --method ddg or fr "
                         f"as microbatches, one per clock; --method {config.method} "
                         + ("computes the whole minibatch at once" if config.method == "bp"
                            else "steps every clock") + ": drop --microbatches")
    if config.batch_size % m:
        raise UsageError(f"--batch-size {config.batch_size} does not split into "
                         f"--microbatches {m} equal microbatches; choose a batch size that "
                         f"is a multiple of {m}")
    if config.placement.replicas > 1:
        raise UsageError(f"--microbatches {m} with --replicas {config.placement.replicas} "
                         "is not supported (replicas average each backward's gradients, "
                         "not a step's sum): drop one of them")
    if config.precision == "fp16":
        raise UsageError(f"--microbatches {m} with --precision fp16 is not supported (a "
                         "step's microbatches may carry different loss scales): use bf16")
    check_microbatches(config.compensation.names, m)


def _validate_length(config: TrainConfig) -> None:
    if config.iterations is not None and config.iterations < 1:
        raise UsageError(f"--iterations must be >= 1 (got {config.iterations})")
    if config.eval_every < 0 or config.warmup_iters < 0:
        raise UsageError(f"--eval-every and --warmup-iters must be >= 0 (got "
                         f"{config.eval_every}, {config.warmup_iters})")
    check_scaled_settings(config)


def _validate_checkpoints(config: TrainConfig) -> None:
    if config.checkpoint_every < 0 or config.checkpoint_every_epochs < 0:
        raise UsageError("--checkpoint-every and --checkpoint-every-epochs must be >= 0")
    if config.stop_after is not None and config.stop_after < 1:
        raise UsageError(f"--stop-after must be >= 1 (got {config.stop_after})")
    checkpoints = config.checkpoint_every or config.checkpoint_every_epochs or config.stop_after
    if (checkpoints or config.resume) and config.method == "dni":
        raise UsageError("checkpoints support --method bp, ddg and fr; not dni yet")
    if (checkpoints or config.resume) and not config.out:
        raise UsageError("checkpoints need an output directory; pass --out")
    if config.log_every < 0:
        raise UsageError(f"--log-every must be >= 0 (got {config.log_every})")
    check_sinks(config.log)


def _validate_model_and_data(config: TrainConfig) -> None:
    _validate_user_model_and_data(config)
    text = config.text_data
    if config.is_language_model and not text:
        raise UsageError(f"--model {config.model} is a language model of token windows: use it "
                         f"with --data {' or '.join(TEXT_DATA)} or text:PATH")
    if text and not (config.is_language_model or is_user_model(config.model)):
        kind = "byte tokens" if config.tokenizer is None else "tokens"
        raise UsageError(f"--data {config.data} holds windows of {kind} for a language "
                         "model: use it with --model gpt-L (e.g. --model gpt-8), hf:DIR "
                         "or FILE.py:FACTORY")
    lm_only = {"--width": config.width, "--heads": config.heads, "--dropout": config.dropout,
               "--tie-embeddings": config.tie_embeddings or None}
    given = [flag for flag, value in lm_only.items() if value is not None]
    if given and not config.is_language_model:
        raise UsageError(f"{', '.join(given)} shape a language model (--model gpt-L); "
                         f"--model {config.model} has no such setting: drop them")
    if config.tie_embeddings and config.method == "dni" and config.stages > 1:
        raise UsageError(
            "--tie-embeddings shares the token embedding (in the first stage) with the "
            "output projection (in the last), and DNI has no rule for a parameter used by "
            f"two stages; with --stages {config.stages} drop --tie-embeddings (untied is the "
            "default), or train it with --method ddg or bp")
    if config.is_language_model:
        width = config.width or GPTConfig.width
        GPTConfig(width=width, heads=config.heads or GPTConfig.heads, context=config.context,
                  dropout=GPTConfig.dropout if config.dropout is None else config.dropout
                  ).check()


def _validate_user_model_and_data(config: TrainConfig) -> None:
    """The checks a user's model or data get before any file is read."""
    if config.tokenizer is not None and not is_text_data(config.data):
        raise UsageError(f"--tokenizer turns a text file into tokens; --data {config.data} is "
                         "not one: pass --data text:PATH, or drop --tokenizer")
    if config.model.startswith("hf:") and not config.text_data:
        raise UsageError(f"--model {config.model} is a causal language model of token ids: "
                         f"train it on --data text:PATH (or {' or '.join(TEXT_DATA)})")
    if is_user_data(config.data) and config.data_dir is not None:
        raise UsageError(f"--data {config.data} names its own file; drop --data-dir")


def _validate_replicas(config: TrainConfig) -> None:
    r, executor, devices = (config.placement.replicas, config.placement.executor,
                            config.placement.devices)
    if config.method not in ("ddg", "fr"):
        fix = ("--method ddg --stages 1 --replicas R is data-parallel backprop"
               if config.method == "bp" else "drop --replicas")
        raise UsageError(f"--replicas averages the gradients of --method ddg or fr between "
                         f"their backward and their step; --method {config.method} has no "
                         f"replicas: {fix}")
    if executor in ("reference", "threads"):
        raise UsageError(f"--replicas {r} runs one process per stage and replica; "
                         f"--executor {executor} runs one process: use --executor "
                         "processes (or torchrun)")
    if config.batch_size % r:
        fit = config.batch_size - config.batch_size % r or r
        raise UsageError(
            f"--batch-size {config.batch_size} is the global minibatch, split into {r} equal "
            f"shards (one per replica), but {config.batch_size} is not divisible by {r}; "
            f"pass a multiple of {r}, e.g. --batch-size {fit}")
    if devices is not None and len(devices) != config.stages * r:
        raise UsageError(f"--devices names {len(devices)} device(s), but with replicas "
                         f"it names one per process: {config.stages} x {r} = "
                         f"{config.stages * r}")


# Placement.check's words for a field -> the flag that sets it on the command line
FLAG_WORDS = (("threads must", "--threads must"), ("replicas must", "--replicas must"),
              ("the peer timeout must", "--timeout must"), ("unknown comm", "unknown --comm"))


def flag_worded(message: str) -> str:
    """``Placement.check``'s message, naming the command line's flag for its field."""
    for words, flag in FLAG_WORDS:
        if message.startswith(words):
            return flag + message[len(words):]
    return message
