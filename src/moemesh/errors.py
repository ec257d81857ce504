"""User-facing errors: one line, exit code 2, no traceback (the CLI catches them)."""

import os
import sys


class UserError(Exception):
    """Bad input from the user: config, files, command line. The message is one line that names the
    field or file and says what would be valid."""


class ConfigError(UserError):
    """A config value is out of range, of the wrong type, unknown, or inconsistent with another."""


def report(message: str) -> None:
    """Write `moemesh: <message>` as one line in a single write, so that lines from several ranks
    sharing a stderr pipe never interleave (one write below PIPE_BUF bytes is atomic)."""
    sys.stderr.flush()
    os.write(2, f"moemesh: {message}\n".encode())
