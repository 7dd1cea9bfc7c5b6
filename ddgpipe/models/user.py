"""A user's own model: ``FILE.py:FACTORY``, ``package.module:FACTORY`` or ``hf:DIR``.

A factory is any callable returning an ``nn.Module``, called with no arguments, or with the
keywords among ``num_classes`` (classes, or the vocabulary of token data) and ``input_shape``
(one sample's shape) that its signature names. The caller seeds torch's RNG right before.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ddgpipe.errors import UsageError

__all__ = ["is_user_model", "load_user_model", "model_label", "FACTORY_KEYWORDS"]

FACTORY_KEYWORDS = ("num_classes", "input_shape")
OBJECT_PREFIX = "object:"  # a model handed to train() as an object, recorded by class name


def is_user_model(spec: str) -> bool:
    """Whether ``spec`` names a user's model rather than one of the registry's."""
    return ":" in spec


def model_label(spec: str) -> str:
    """A short name for file and folder names: the factory's, or the HF folder's."""
    if spec.startswith("hf:"):
        return "hf-" + (Path(spec[3:]).resolve().name or "model")
    return spec.rpartition(":")[2] if is_user_model(spec) else spec


def load_user_model(spec: str, *, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The module ``spec`` names, built now (from the global RNG, which the caller seeds)."""
    if spec.startswith("hf:"):
        from ddgpipe.models.huggingface import load_hf_model

        return load_hf_model(spec[3:])
    if spec.startswith(OBJECT_PREFIX):
        raise UsageError(f"model {spec} was handed to train() as an object; pass it again with "
                         "train(config, model=...)")
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UsageError(f"--model {spec} names no factory; pass FILE.py:FACTORY, "
                         "package.module:FACTORY or hf:DIR")
    factory = _factory(target, name, spec)
    given = {"num_classes": num_classes, "input_shape": tuple(input_shape)}
    try:
        model = factory(**{k: v for k, v in given.items() if k in _keywords(factory)})
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(f"the model factory {spec} raised {type(e).__name__}: {first}; fix the "
                         "factory (it is called with no arguments, or with the keywords "
                         f"{' and '.join(FACTORY_KEYWORDS)} it names)") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"the model factory {spec} returned a {type(model).__name__}, not a "
                         "torch.nn.Module; return the network itself")
    return model


def _factory(target: str, name: str, spec: str) -> Callable[..., Any]:
    module = _load_file(Path(target)) if target.endswith(".py") or "/" in target \
        else _import(target)
    if not hasattr(module, name):
        raise UsageError(f"{target} defines no {name!r}; name a function or class in it "
                         f"(--model {target}:FACTORY)")
    factory = getattr(module, name)
    if not callable(factory):
        raise UsageError(f"{spec}: {name} is a {type(factory).__name__}, not callable; name a "
                         "function (or class) that returns an nn.Module")
    return factory


def _load_file(path: Path) -> Any:
    """The Python file at ``path`` as a module (named by its path, loaded once a process)."""
    if not path.is_file():
        raise UsageError(f"--model {path}: no such file; pass the path of a Python file "
                         "defining the factory")
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"ddgpipe_user_model_{key}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None  # a .py path always has one
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"running {path} raised {type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]}; fix the file") from None
    sys.modules[module_name] = module
    return module


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UsageError(f"cannot import {name} ({e}); install it, put it on PYTHONPATH, or "
                         "pass FILE.py:FACTORY") from None


def _keywords(factory: Callable[..., Any]) -> set[str]:
    """Which of :data:`FACTORY_KEYWORDS` the factory accepts (all of them with ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return set(FACTORY_KEYWORDS)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names & set(FACTORY_KEYWORDS)
