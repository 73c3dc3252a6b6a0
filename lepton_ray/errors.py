"""User-facing errors: one line that names the problem, exit code 2, no traceback."""

from __future__ import annotations

import threading

INTERRUPTED = threading.Event()
"""Set when the command got SIGTERM: whatever error follows, runs end KILLED."""


def terminate_as_interrupt() -> None:
    """SIGTERM (a job stop, ``kill``) ends a command like Ctrl-C: runs end KILLED, not RUNNING.

    Called at a command's start and again after ``ray.init``, which installs its own
    SIGTERM handler (a plain exit) in the driver.
    """
    import signal

    def interrupt(signum, frame):
        INTERRUPTED.set()
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


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
