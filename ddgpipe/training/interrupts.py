"""Ctrl-C ends a training run even when its KeyboardInterrupt lands where it is swallowed."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["InterruptGuard"]


class InterruptGuard:
    """Ctrl-C must end a run even when the KeyboardInterrupt it raises lands in code that
    swallows exceptions: a finaliser, a ``__del__`` or a generator collected on the main thread
    only prints "Exception ignored" and training would go on to the end. So the handler also
    records the request, and the loop raises it again at the next minibatch (:meth:`check`).
    Installed only on the main thread and only over Python's default handler, so a program
    that set its own keeps it."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None  # the handler this one replaced

    def __enter__(self) -> InterruptGuard:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


