"""User-facing errors: one line, exit code 2, no traceback (the CLI catches them)."""


class UserError(Exception):
    """Bad input from the user: config, files, command line. The message is one line that names the
    field or file and says what would be valid."""


class ConfigError(UserError):
    """A config value is out of range, of the wrong type, unknown, or inconsistent with another."""
