"""User-facing errors: one line that names the problem, exit code 2, no traceback."""

from __future__ import annotations


class LeptonError(Exception):
    """An error caused by the user's input (config, data, request), not by a bug.

    The CLI prints ``str(err)`` on one line and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()) if "\n" not in message else message)


class ConfigError(LeptonError):
    """A config file or override that cannot be loaded or validated."""


class DataError(LeptonError):
    """A data file that is missing, malformed or unusable for the task."""


class StageError(LeptonError):
    """A stage that cannot run because an earlier stage's output is missing."""
