"""One error type for bad user input, so the CLI can print one line and exit with status 2."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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


def require_known(flag: str, values, allowed, what: str) -> None:
    """Bad input unless every one of `values` is in `allowed`: one error naming the unknown ones and the choices."""
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise FromageInputError(f"{flag} {', '.join(map(repr, unknown))}", f"unknown {what}",
                                f"choose from {', '.join(allowed)}")


def read_json(path: str | Path, missing: str = "missing", hint: str | None = None) -> Any:
    """The parsed contents of a JSON file. A missing file raises `FromageInputError(path, missing, hint)`;
    unreadable or malformed JSON raises one naming the file and the parser's complaint."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FromageInputError(path, missing, hint) from None
    except UnicodeDecodeError as err:
        raise FromageInputError(path, f"malformed JSON: not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FromageInputError(path, f"malformed JSON: {err}") from None
