"""One exception type for bad user input, so the CLI can print one line and exit 2 instead of a traceback."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input from the user (file, line, field, value). The message is shown as-is, on one line."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


def where(path, line=None, field=None) -> str:
    """`file:line: field` prefix used by every input error, so users can jump to the spot."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    if field:
        out += f": {field}"
    return out
