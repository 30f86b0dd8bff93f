"""One exception type for user-facing failures: its message is the one line the CLI prints."""


class SlipwayError(Exception):
    """A failure with a one-line message naming the cause and the fix; CLI exit code ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
