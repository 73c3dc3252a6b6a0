"""What the command groups share: the common options, the terminal (``say``, ``fail``, the
console's log file), the one-line errors and their exit codes, and loading a config."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated

import typer

from lepton_ray import console
from lepton_ray.errors import LeptonError, terminate_as_interrupt

ConfigArg = Annotated[
    Path, typer.Argument(help="Experiment YAML, e.g. experiments/quickstart.yaml.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a key: --set train.lr=3e-4 (repeatable)."),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Show Ray's and the libraries' output too (also: lepton-ray -v COMMAND).",
    ),
]
_OPTIONS = {"verbose": False}
"""The root options (``lepton-ray -v COMMAND``), set by the root app's callback."""


def say(message: str) -> None:
    console.say(message)


def fail(message: str, code: int) -> None:
    console.error(f"error: {message}")
    raise typer.Exit(code)


def start_console(command: str, cfg=None, verbose: bool = False) -> None:
    """Send everything but the stage lines to a log file; call before importing Ray."""
    console.start(
        command,
        cfg.output_dir / cfg.name if cfg is not None else None,
        verbose=verbose or _OPTIONS["verbose"],
    )


def handle_errors(fn):
    """One line and a non-zero exit for user errors; a short line for crashes too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        terminate_as_interrupt()
        try:
            return fn(*args, **kwargs)
        except LeptonError as err:
            console.log_exception(err)
            fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except typer.Exit:
            raise
        except Exception as err:  # noqa: BLE001 - last resort: no traceback unless asked
            console.log_exception(err)
            inner = _user_error(err)
            if inner is not None:  # raised in a Ray task or actor: its own one line
                fail(str(inner), inner.exit_code)
            if os.environ.get("LEPTON_DEBUG"):
                console.release()  # the traceback goes to the real terminal
                raise
            fail(
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                "(set LEPTON_DEBUG=1 for the traceback)",
                1,
            )
        finally:
            console.finish()

    return wrapper


def _user_error(err: BaseException) -> LeptonError | None:
    """The LeptonError that a Ray task's error wraps (its cause, or that cause's cause)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, LeptonError):
            return current
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    # Pickled across processes, an error loses its __cause__; Ray keeps the remote
    # traceback's text, whose last line names the error.
    import re

    from lepton_ray import errors

    found = re.findall(r"^lepton_ray\.errors\.(\w+): (.+)$", str(err), re.M)
    kind = getattr(errors, found[-1][0], None) if found else None
    if isinstance(kind, type) and issubclass(kind, LeptonError):
        return kind(found[-1][1])
    return None


def _load(config: Path, overrides: list[str] | None):
    from lepton_ray.config import load_experiment

    return load_experiment(config, overrides or [])
