"""Errors a user can act on: bad input (exit code 2) and a failed worker (exit code 1).

The CLI turns a :class:`UsageError` into a single line on stderr and exit code 2, so every
message must say what was given, what was expected, and how to fix it.
"""

__all__ = ["UsageError", "NonFiniteLossError", "WorkerError", "StageError", "PeerError",
           "Terminated"]


class UsageError(ValueError):
    """Bad input or configuration: printed as one line by the CLI, never as a traceback."""


class NonFiniteLossError(UsageError):
    """The loss became NaN or infinite: training cannot continue from here."""

    def __init__(self, loss: float, minibatch: int):
        super().__init__(
            f"loss is {loss} at minibatch {minibatch}: training diverged; lower the learning "
            "rate (--lr), add warm-up, or check the input data for NaN/inf"
        )
        self.minibatch = minibatch


class WorkerError(RuntimeError):
    """A worker process failed; ``rank`` names it and the message says why."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"rank {rank}: {message}")
        self.rank = rank
        self.cause = message


class StageError(RuntimeError):
    """A stage of the threaded executor failed or timed out; ``stage`` names it."""

    def __init__(self, stage: int, message: str):
        super().__init__(f"stage {stage}: {message}")
        self.stage = stage
        self.cause = message


class PeerError(RuntimeError):
    """A peer process (a neighbour stage, or a replica in a gradient average) failed, died or
    timed out."""


class Terminated(BaseException):
    """SIGTERM arrived while workers ran: raised so that they are stopped and reaped before
    the process ends (a BaseException, like KeyboardInterrupt, so ``except Exception`` in a
    user's code does not swallow it)."""
