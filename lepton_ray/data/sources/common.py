"""Shared by every source kind: what a read returns, its task size and error lines."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lepton_ray.errors import LeptonError

if TYPE_CHECKING:
    import ray.data

MAX_BAD_ROWS_KEPT = 100
"""Bad rows listed with file, line and reason; all of them are counted."""


@dataclass
class Source:
    """What ``read_source`` returns.

    Attributes:
        ds: Lazy Ray Dataset with exactly the string columns ``text`` and ``label``.
        bad_rows: The first ``MAX_BAD_ROWS_KEPT`` skipped rows, each
            ``{"file": str, "line": int | None, "reason": str}`` (line: 1-based physical line
            where the row starts).
        n_bad: Rows skipped as malformed (``data.on_bad_row: skip``); 0 otherwise.
        n_rows: Rows the dataset yields before ``data.max_rows``; rows in the files =
            ``n_rows + n_bad``.
        fingerprint: Same as ``fingerprint(cfg)``, computed during the scan.
        files: The files ``read_files`` read, as ``source_files`` lists them.
        columns: The columns ``read_files`` read (the required ones and the optional ones
            every file has).
    """

    ds: ray.data.Dataset
    bad_rows: list[dict[str, Any]] = field(default_factory=list)
    n_bad: int = 0
    n_rows: int = 0
    fingerprint: str = ""
    files: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)


TASK_CPUS = 0.5
"""CPUs per read or map task of the data stage: with the tokenizer actors at 0.5 each, no
task needs a whole CPU, so actors spread over small nodes can never starve the reads."""


_OURS = re.compile(r"^lepton_ray\.errors\.\w+: (.+)$", re.M)


def root_cause(err: BaseException) -> str:
    """The innermost error message, on one line (Ray nests the reader's error). One of our
    own errors raised inside a Ray task (a malformed row a task's reader refused) is found
    in the chain or in the remote traceback Ray prints, and its message is the answer."""
    chain, seen = err, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, LeptonError):
            return str(chain).strip().splitlines()[0][:400]
        found = _OURS.search(str(chain))
        if found:
            return found.group(1).strip()[:400]
        chain = chain.__cause__ or getattr(chain, "cause", None)
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    lines = [line for line in text if line.strip() and not line.startswith(("Traceback", "  "))]
    return (lines[-1] if lines else type(err).__name__)[:400]
