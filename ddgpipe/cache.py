"""Where ddgpipe keeps what it computes once per machine: generated data sets, timed cuts.

``$DDGPIPE_CACHE``, else ``$XDG_CACHE_HOME/ddgpipe``, else ``~/.cache/ddgpipe``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir"]

CACHE_ENV = "DDGPIPE_CACHE"


def cache_dir() -> Path:
    """Where ddgpipe keeps generated data and timed cuts: ``$DDGPIPE_CACHE``,
    ``$XDG_CACHE_HOME/ddgpipe`` or ``~/.cache/ddgpipe``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ddgpipe"
