"""The ``ddgpipe`` command: options, commands, and the entry point that runs them."""

from ddgpipe.cli.main import build_parser, main

__all__ = ["main", "build_parser"]
