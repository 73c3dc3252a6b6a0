"""What reaches the terminal: the stage lines, a training progress bar, the summary.

Everything else (Ray's and the libraries' logs, warnings, worker output, progress bars,
C-level output written straight to file descriptors 1 and 2) goes to a log file.

A command calls :func:`start` after it has read its config and before it imports Ray,
torch or MLflow. In a real process :func:`start`

* opens the log file (append mode),
* keeps a duplicate of fds 1 and 2 for the terminal,
* points fds 1 and 2 at the log file, so C-level output and child processes land there,
* replaces ``sys.stdout``/``sys.stderr`` with line writers that log every line and forward
  to the terminal only stage lines (``[data] ...``, ``[train] ...``; Ray's
  ``(Actor pid=...)`` prefix, colour codes and dedup notes removed).

The redirection then lasts until the process ends, so Ray's own shutdown noise, which
runs from ``atexit`` after the command returned, lands in the log too. When the streams
are not the process's own (``typer.testing.CliRunner``, pytest's capture), fds are left
alone, only the Python streams are filtered, and :func:`finish` restores them when the
command ends.

With ``verbose``, nothing is filtered or redirected: the writers pass everything through
to the terminal as before and copy each line to the log file.

Only the standard library is imported here: ``lepton-ray --help`` must stay fast.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

STAGE_TAGS = frozenset(
    {"data", "train", "tune", "mlflow", "registry", "compress", "serve", "ray", "eval", "retrain"}
)
"""Lines starting with ``[tag] `` for one of these tags are shown on the terminal."""

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
# Ray's log forwarding: "(RayTrainWorker pid=1234, ip=10.0.0.1) message"; a task's name
# may hold parentheses itself: "(HashAggregateReduce(key_columns=('a',)) pid=99) message".
_PID = re.compile(r"\bpid=\S")
_DEDUP = re.compile(r"\s*\[repeated \d+x across cluster\](?:\s*\(Ray deduplicates logs.*\))?\s*$")
_STAGE = re.compile(r"^\[(?P<tag>[a-z][a-z0-9_-]*)\](?:\s|$)")
_TRAIN_STEP = re.compile(
    r"^\[train\] epoch (?P<epoch>\d+)/(?P<epochs>\d+) step (?P<step>\d+)/(?P<steps>\d+) "
    r"loss (?P<loss>\S+)(?: lr (?P<lr>\S+))? (?P<rate>\S+) samples/s\s*$"
)
_MAX_PARTIAL = 64 * 1024


# --------------------------------------------------------------------------- line filtering
def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def split_ray_prefix(line: str) -> tuple[str, str]:
    """``(Worker pid=1, ip=x) msg`` -> ``("Worker pid=1, ip=x", "msg")``; else ``("", line)``."""
    if not line.startswith("("):
        return "", line
    depth = 0
    for index, char in enumerate(line):
        depth += (char == "(") - (char == ")")
        if depth == 0:
            source = line[1:index]
            if not _PID.search(source):
                return "", line
            rest = line[index + 1 :]
            return source.strip(), rest[1:] if rest.startswith(" ") else rest
    return "", line


def clean_line(raw: str) -> tuple[str, str]:
    """A captured line as the terminal would show it: (source, message).

    Colour codes, carriage-return redraws (only the last state counts), Ray's
    ``(... pid=...)`` prefix and its ``[repeated Nx across cluster]`` note are removed.
    """
    text = last_redraw(strip_ansi(raw)).rstrip()
    source, text = split_ray_prefix(text)
    return source, _DEDUP.sub("", text).rstrip()


def last_redraw(text: str) -> str:
    """What a terminal shows of a line redrawn with ``\\r``: its last non-empty state."""
    if "\r" not in text:
        return text
    parts = [part for part in text.split("\r") if part.strip()]
    return parts[-1] if parts else ""


def is_stage_line(text: str, tags: frozenset[str] = STAGE_TAGS) -> bool:
    match = _STAGE.match(text)
    return bool(match) and match.group("tag") in tags


def stage_line(raw: str, tags: frozenset[str] = STAGE_TAGS) -> tuple[str, str] | None:
    """(source, cleaned line) if ``raw`` is a stage line, else None."""
    source, text = clean_line(raw)
    return (source, text) if is_stage_line(text, tags) else None


# --------------------------------------------------------------------------- progress bar
@dataclass(frozen=True)
class TrainStep:
    """One ``[train] epoch E/N step S/T loss L lr X R samples/s`` line (train/loop.py)."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    rate: float


def parse_train_step(text: str) -> TrainStep | None:
    match = _TRAIN_STEP.match(text)
    if not match:
        return None
    try:
        return TrainStep(
            epoch=int(match["epoch"]),
            epochs=int(match["epochs"]),
            step=int(match["step"]),
            steps=int(match["steps"]),
            loss=float(match["loss"]),
            rate=float(match["rate"]),
        )
    except ValueError:
        return None


def render_bar(step: TrainStep, width: int = 20) -> str:
    """``[train] epoch 1/2 [########------------] 24/50 steps  loss 0.6100  112 samples/s``."""
    total = max(step.steps, 1)
    filled = min(width, max(0, round(width * step.step / total)))
    bar = "#" * filled + "-" * (width - filled)
    return (
        f"[train] epoch {step.epoch}/{step.epochs} [{bar}] {step.step}/{step.steps} steps  "
        f"loss {step.loss:.4f}  {step.rate:.0f} samples/s"
    )


class TerminalView:
    """Writes terminal lines; turns training step lines into a progress bar.

    On a TTY the bar is redrawn in place (``\\r``) until another line arrives, which leaves
    the bar's last state on its own line. Elsewhere a bar line is printed at the start of
    an epoch, at every further quarter of it, and at its last step.
    """

    def __init__(
        self, write: Callable[[str], None], tty: bool, columns: Callable[[], int] = lambda: 100
    ):
        self._write = write
        self.tty = tty
        self._columns = columns
        self._open: str | None = None  # source of the bar being redrawn (TTY)
        self._shown: dict[str, TrainStep] = {}  # last bar printed per source (not a TTY)

    def show(self, text: str, source: str = "") -> None:
        step = parse_train_step(text)
        if step is None:
            self.end()
            self._write(text + "\n")
            return
        bar = render_bar(step)
        if self.tty:
            if self._open is not None and self._open != source:
                self.end()
            columns = self._columns()  # 0 when the size is unknown (a bare pty)
            self._write("\r\x1b[K" + (bar[: columns - 1] if columns >= 20 else bar))
            self._open = source
        elif self._due(source, step):
            self._write(bar + "\n")

    def end(self) -> None:
        """Leave a bar being redrawn as it is and move to the next line."""
        if self._open is not None:
            self._write("\n")
            self._open = None

    def _due(self, source: str, step: TrainStep) -> bool:
        last = self._shown.get(source)
        quarter = 4 * step.step // max(step.steps, 1)
        due = (
            last is None
            or (last.epoch, last.epochs, last.steps) != (step.epoch, step.epochs, step.steps)
            or step.step < last.step
            or step.step >= step.steps
            or quarter > 4 * last.step // max(last.steps, 1)
        )
        if due:
            self._shown[source] = step
        return due


# --------------------------------------------------------------------------- log paths
def log_path(
    command: str,
    run_dir: Path | None = None,
    now: float | None = None,
    root: Path = Path("outputs"),
) -> Path:
    """``<run_dir>/logs/<command>-<YYYYmmdd-HHMMSS>.log``; ``outputs/logs/...`` without one."""
    folder = (Path(run_dir) if run_dir is not None else Path(root)) / "logs"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", command).strip("-") or "lepton-ray"
    return folder / f"{slug}-{stamp}.log"


def unique_path(path: Path) -> Path:
    """``path``, or ``name-2.log``, ``name-3.log``... if it already exists."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def display_path(path: Path, cwd: Path | None = None) -> str:
    """Relative to the working directory when it is below it, else absolute."""
    path = Path(os.path.abspath(path))
    base = Path(os.path.abspath(cwd or os.getcwd()))
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- the session
class _Capture(io.TextIOBase):
    """Replaces sys.stdout/sys.stderr: hands complete lines to the console."""

    def __init__(self, console: Console, name: str, original: TextIO):
        super().__init__()
        self._console = console
        self._name = name
        self._original = original
        self._partial = ""

    # What libraries look at on sys.stdout ---------------------------------------------
    @property
    def name(self) -> str:  # type: ignore[override]
        return f"<{self._name}>"

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._original, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return getattr(self._original, "errors", None) or "strict"

    @property
    def line_buffering(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        # Quiet mode: progress bars of tqdm and friends go to a file, not a terminal.
        if self._console.verbose:
            return _isatty(self._original)
        return False

    def fileno(self) -> int:
        return self._original.fileno()  # fd 1/2 (the log file while redirected)

    def close(self) -> None:  # someone closing sys.stdout must not end the session
        self.flush()

    # Writing ---------------------------------------------------------------------------
    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        console = self._console
        with console.lock:
            if console.verbose:
                with contextlib.suppress(OSError, ValueError):
                    self._original.write(text)
            self._partial += text
            if "\n" in self._partial:
                *lines, self._partial = self._partial.split("\n")
                for line in lines:
                    console.captured(line)
            if len(self._partial) > _MAX_PARTIAL:  # a redrawn bar that never ends its line
                console.captured(self._partial)
                self._partial = ""
        return len(text)

    def flush(self) -> None:
        if self._console.verbose:
            with contextlib.suppress(OSError, ValueError):
                self._original.flush()

    def drain(self) -> None:
        """Hand over an unfinished last line."""
        with self._console.lock:
            if self._partial:
                partial, self._partial = self._partial, ""
                self._console.captured(partial)


class Console:
    """One command's output: a log file, the terminal, and the filter between them."""

    def __init__(
        self,
        path: Path,
        *,
        verbose: bool = False,
        redirect_fds: bool | None = None,
        header: str = "",
    ):
        self.path = Path(path)
        self.verbose = verbose
        self.lock = threading.RLock()
        self.redirect_fds = (not verbose and _owns_fds()) if redirect_fds is None else redirect_fds
        self._header = header
        self._log: TextIO | None = None
        self._saved: tuple[TextIO, TextIO] | None = None
        self._term_fds: tuple[int, int] | None = None
        self._captures: tuple[_Capture, _Capture] | None = None
        self.term_out: TextIO = sys.stdout
        self.term_err: TextIO = sys.stderr
        self.view = TerminalView(self._write_out, tty=False)
        self.started = False
        self.finished = False

    # Set-up and tear-down --------------------------------------------------------------
    def start(self) -> Console:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.path, "a", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"# {self._header or 'lepton-ray'} (pid {os.getpid()}, {stamp})\n")
        out, err = sys.stdout, sys.stderr
        self._saved = (out, err)
        if self.redirect_fds:
            for stream in (out, err, sys.__stdout__, sys.__stderr__):
                _flush(stream)
            fds = (os.dup(1), os.dup(2))  # not inheritable: children never get the terminal
            self._term_fds = fds
            encoding = getattr(out, "encoding", None) or "utf-8"
            self.term_out = open(fds[0], "w", encoding=encoding, errors="replace", closefd=False)  # noqa: SIM115
            self.term_err = open(fds[1], "w", encoding=encoding, errors="replace", closefd=False)  # noqa: SIM115
            os.dup2(self._log.fileno(), 1)
            os.dup2(self._log.fileno(), 2)
            tty = os.isatty(fds[0])
            atexit.register(self._at_exit)
        else:
            self.term_out, self.term_err = out, err
            tty = _isatty(out)
        self.view = TerminalView(self._write_out, tty=tty and not self.verbose, columns=self._cols)
        self._captures = (_Capture(self, "stdout", out), _Capture(self, "stderr", err))
        sys.stdout, sys.stderr = self._captures
        self.started = True
        return self

    def finish(self) -> None:
        """The command is over. Streams the process owns stay redirected until it exits."""
        if not self.started or self.finished:
            return
        self._drain()
        with self.lock:
            self.view.end()
            _flush(self.term_out)
        if not self.redirect_fds:
            self.release()

    def release(self) -> None:
        """Undo everything now: Python streams, fds 1 and 2; close the log."""
        if not self.started or self.finished:
            return
        self._drain()
        with self.lock:
            self.view.end()
            self.finished = True
            if self._captures and self._saved:
                if sys.stdout is self._captures[0]:
                    sys.stdout = self._saved[0]
                if sys.stderr is self._captures[1]:
                    sys.stderr = self._saved[1]
            if self._term_fds is not None:
                for stream in (self.term_out, self.term_err, *(self._saved or ())):
                    _flush(stream)
                os.dup2(self._term_fds[0], 1)
                os.dup2(self._term_fds[1], 2)
                for fd in self._term_fds:
                    os.close(fd)
                self._term_fds = None
                self.term_out, self.term_err = self._saved or (sys.stdout, sys.stderr)
                atexit.unregister(self._at_exit)
            if self._log is not None:
                self._log.close()
                self._log = None
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None

    def _at_exit(self) -> None:
        # Runs after Ray's own atexit shutdown (registered later, run earlier). Fds stay on
        # the log file: whatever the interpreter prints while it finalises belongs there.
        try:
            self._drain()
            with self.lock:
                self.view.end()
                for stream in (self.term_out, self.term_err, *(self._saved or ())):
                    _flush(stream)
                if self._log is not None:
                    self._log.flush()
        except Exception:  # noqa: BLE001 - never fail the exit
            pass

    def _drain(self) -> None:
        for capture in self._captures or ():
            capture.drain()

    # Output --------------------------------------------------------------------------
    def say(self, message: str) -> None:
        """A line of lepton-ray's own: terminal and log."""
        with self.lock:
            for line in message.split("\n"):
                self._log_line(line)
                if self.verbose:
                    self._write_out(line + "\n")
                else:
                    self.view.show(line)

    def error(self, message: str) -> None:
        """The error line on the terminal's stderr (one line), then where the log is."""
        with self.lock:
            self._log_line(message)
            self.view.end()
            _flush(self.term_out)
            _write(self.term_err, strip_ansi(message) + "\n")
            _flush(self.term_err)
            self._write_out(f"log: {display_path(self.path)}\n")

    def captured(self, raw: str) -> None:
        """A line written to sys.stdout/sys.stderr by anyone: log it, maybe show it."""
        with self.lock:
            self._log_line(last_redraw(raw).rstrip())
            if self.verbose:
                return
            found = stage_line(raw)
            if found is not None:
                source, text = found
                self.view.show(text, source)

    def log_exception(self, err: BaseException) -> None:
        with self.lock:
            text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
            for line in text.rstrip("\n").split("\n"):
                self._log_line(line)

    def _log_line(self, line: str) -> None:
        if self._log is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._log.write(strip_ansi(line) + "\n")

    def _write_out(self, text: str) -> None:
        _write(self.term_out, text)
        _flush(self.term_out)

    def _cols(self) -> int:
        try:
            fd = self._term_fds[0] if self._term_fds else self.term_out.fileno()
            return os.get_terminal_size(fd).columns
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            return 100


def _owns_fds() -> bool:
    """Whether sys.stdout/sys.stderr are this process's fds 1 and 2 (not a test's capture)."""
    try:
        return (
            sys.stdout is sys.__stdout__
            and sys.stderr is sys.__stderr__
            and sys.stdout.fileno() == 1
            and sys.stderr.fileno() == 2
        )
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _write(stream, text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        stream.write(text)


def _flush(stream) -> None:
    try:
        if stream is not None:
            stream.flush()
    except (OSError, ValueError, AttributeError):
        pass


# --------------------------------------------------------------------------- module API
_ACTIVE: Console | None = None


def start(
    command: str,
    run_dir: Path | None = None,
    *,
    verbose: bool = False,
    redirect_fds: bool | None = None,
) -> Console:
    """Begin capturing this command's output; prints ``log: PATH`` first."""
    global _ACTIVE
    if _ACTIVE is not None and not _ACTIVE.finished:
        return _ACTIVE
    path = unique_path(log_path(command, run_dir))
    header = "lepton-ray " + " ".join(sys.argv[1:]) if sys.argv else command
    console = Console(path, verbose=verbose, redirect_fds=redirect_fds, header=header).start()
    _ACTIVE = console
    console.say(f"log: {display_path(path)}")
    return console


def active() -> Console | None:
    return _ACTIVE if _ACTIVE is not None and not _ACTIVE.finished else None


def say(message: str) -> None:
    console = active()
    if console is None:
        print(message, flush=True)
    else:
        console.say(message)


def error(message: str) -> None:
    console = active()
    if console is None:
        print(message, file=sys.stderr, flush=True)
    else:
        console.error(message)


def log_exception(err: BaseException) -> None:
    console = active()
    if console is not None:
        console.log_exception(err)


def finish() -> None:
    """End of a command: in-process (tests) everything is restored; see Console.finish."""
    console = active()
    if console is not None:
        console.finish()
        if console.finished:
            globals()["_ACTIVE"] = None


def release() -> None:
    """Give the real terminal back now (e.g. to show a traceback)."""
    console = active()
    if console is not None:
        console.release()
