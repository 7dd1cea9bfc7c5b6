"""The one exception type for problems a user can fix.

The CLI turns a :class:`UsageError` into a single line on stderr and exit code 2, so every
message must say what was given, what was expected, and how to fix it.
"""

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input or configuration: printed as one line by the CLI, never as a traceback."""
