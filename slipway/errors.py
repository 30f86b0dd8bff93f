"""One exception type for user-facing failures (its message is the one line the CLI prints), and
the one table of exit codes every command uses."""
from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    """Exit codes of every `invoke` command (the README's command table says which command uses which)."""

    OK = 0
    FAILED = 1  # the command ran and failed (a deploy that rolled back, was interrupted; a bad input)
    PENDING = 2  # `invoke migrate --check`: migrations are pending
    LOCK_HELD = 4  # another run holds a host's deploy lock


class SlipwayError(Exception):
    """A failure with a one-line message naming the cause and the fix; CLI exit code ``exit_code``."""

    def __init__(self, message: str, exit_code: int = Exit.FAILED):
        super().__init__(message)
        self.exit_code = int(exit_code)
