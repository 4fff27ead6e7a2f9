"""One error type for bad user input, so the CLI can print one line and exit with status 2."""
from __future__ import annotations

from pathlib import Path


class FromageInputError(ValueError):
    """A file, directory or argument the user gave us is missing or malformed.

    The message always names what was wrong (a path or an argument) and, where we can tell, what to do.
    """

    def __init__(self, where: str | Path, problem: str, hint: str | None = None):
        self.where = str(where)
        self.problem = problem
        self.hint = hint
        message = f"{self.where}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)
