"""Optional dependencies, imported on first use: a missing one is one line naming the extra."""

from __future__ import annotations

from types import ModuleType

from ddgpipe.errors import UsageError

__all__ = ["require_transformers"]


def require_transformers(what: str) -> ModuleType:
    """``transformers``, or a UsageError saying that ``what`` needs it and how to get it."""
    try:
        import transformers
    except ImportError:
        raise UsageError(f"{what} needs HuggingFace transformers, which is not installed; run "
                         "`pip install 'ddgpipe[hf]'`") from None
    return transformers
