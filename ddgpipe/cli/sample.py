"""``ddgpipe sample RUN``: text written by a trained language model run (``gpt-L``, or a
user's model on text), deterministic for a seed."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ddgpipe.data.user import is_text_data
from ddgpipe.errors import UsageError
from ddgpipe.models import build_model, is_language_model, is_user_model, load_user_model

__all__ = ["add_sample_command", "cmd_sample", "load_language_model"]

BYTE_VOCAB = 256  # ddgpipe's corpora are bytes: token id = byte value


def add_sample_command(sub: argparse._SubParsersAction) -> None:
    """Register ``sample`` on the ``ddgpipe`` subcommands (called from ``build_parser``)."""
    p = sub.add_parser("sample", help="write text with a trained gpt-L run",
                       description="Continue a prompt with a language model trained by "
                       "`ddgpipe train --model gpt-L`: byte tokens, sampled as nanoGPT does "
                       "(temperature, top-k), the same text for the same seed.")
    p.add_argument("run", metavar="RUN_DIR", help="the run's folder (config.json, model.pt)")
    p.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    p.add_argument("--tokens", type=int, default=200, metavar="N",
                   help="bytes to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="divides the logits: below 1 sharper, above 1 flatter (default: "
                        "%(default)s)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K likeliest bytes only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling; same seed, same "
                   "text (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the model runs (default: %(default)s)")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    from ddgpipe.models.gpt import generate

    if not args.prompt:
        raise UsageError("--prompt is empty; give at least one character to continue")
    if args.tokens < 1:
        raise UsageError(f"--tokens must be >= 1 (got {args.tokens})")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0 (got {args.temperature}); a small one "
                         "such as 0.01 samples almost greedily")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1 (got {args.top_k})")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device; use --device cpu")
    run = Path(args.run)
    model = load_language_model(run).to(args.device).eval()
    saved = read_run_config(run)
    tokenizer = saved.get("tokenizer")
    encode, decode = _codec(tokenizer)
    prompt = torch.tensor([encode(args.prompt)], dtype=torch.long, device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    context = None if is_language_model(str(saved.get("model"))) else int(saved["context"])
    vocab = saved.get("data_info", {}).get("vocabulary", BYTE_VOCAB)  # the ids it decodes
    ids = generate(model, prompt, args.tokens, temperature=args.temperature,
                   top_k=args.top_k, generator=generator, context=context, vocab=vocab)
    text = decode(ids[0].tolist())
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    return 0


def _codec(tokenizer: str | None) -> tuple[Callable[[str], list[int]],
                                           Callable[[list[int]], str]]:
    """Text to token ids and back: UTF-8 bytes, or the run's HuggingFace tokenizer."""
    if tokenizer is None:
        return (lambda text: list(text.encode("utf-8")),
                lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    from ddgpipe.data.user import load_tokenizer

    tok = load_tokenizer(tokenizer)
    return (lambda text: tok(text, add_special_tokens=False)["input_ids"],
            lambda ids: tok.decode(ids))


def read_run_config(run: Path) -> dict:
    """``run``'s config.json, or one line saying why it cannot be read."""
    try:
        return json.loads((run / "config.json").read_text())
    except OSError:
        raise UsageError(f"{run} has no readable config.json; pass the folder of a run "
                         "written by `ddgpipe train --model gpt-L`") from None
    except ValueError:
        raise UsageError(f"{run}/config.json is not valid JSON; pass an intact run") from None


def load_language_model(run: Path) -> nn.Module:
    """The trained language model of ``run``, rebuilt from its ``config.json`` (a gpt-L, or a
    user's model on text: its factory is called again, or its hf:DIR read) and
    ``model.pt``."""
    saved = read_run_config(run)
    model_name = str(saved.get("model"))
    text = saved.get("data") == "shakespeare" or is_text_data(saved.get("data"))
    if not (is_language_model(model_name) or (is_user_model(model_name) and text)):
        raise UsageError(f"{run} is a {model_name} run, not a language model; sample from a "
                         "run trained with --model gpt-L, or a model of yours on text")
    if not (run / "model.pt").exists():
        raise UsageError(f"{run} has no model.pt (written when a run ends); finish it with "
                         f"`ddgpipe train --resume {run}` first")
    try:
        state = torch.load(run / "model.pt", weights_only=True, map_location="cpu")
    except Exception as e:
        raise UsageError(f"cannot load {run}/model.pt ({type(e).__name__}); it is damaged or "
                         "not a ddgpipe model") from None
    model = _user_model(saved) if is_user_model(model_name) else _gpt(run, saved, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{run}/model.pt does not fit the model its config.json describes "
                         f"({first})") from None
    return model


def _gpt(run: Path, saved: dict, state: dict) -> nn.Module:
    vocab = next((v.shape[0] for k, v in state.items() if k.endswith("tokens.weight")), None)
    if vocab != BYTE_VOCAB:
        raise UsageError(f"{run}/model.pt has a vocabulary of {vocab} tokens, not the 256 bytes "
                         "`ddgpipe sample` decodes")
    options = {k: saved.get(k) for k in ("width", "heads", "context", "tie_embeddings")}
    return build_model(str(saved["model"]), num_classes=vocab, dropout=0.0,
                       **{k: v for k, v in options.items() if v is not None})


def _user_model(saved: dict) -> nn.Module:
    """A user's model rebuilt as the run built it (its weights are loaded after)."""
    vocab = saved.get("data_info", {}).get("vocabulary", BYTE_VOCAB)
    return load_user_model(str(saved["model"]), num_classes=vocab,
                           input_shape=(int(saved["context"]),))
