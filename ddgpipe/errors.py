"""The one exception type for problems a user can fix.

The CLI turns a :class:`UsageError` into a single line on stderr and exit code 2, so every
message must say what was given, what was expected, and how to fix it.
"""

__all__ = ["UsageError", "NonFiniteLossError"]


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
