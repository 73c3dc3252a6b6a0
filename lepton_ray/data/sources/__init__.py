"""Sources: files, folders, globs or storage URIs (CSV, TSV, JSONL, Parquet), or a Hugging
Face ``datasets`` split, read into a Ray Dataset of two string columns, ``text`` and ``label``.

Every file is scanned once before Ray reads it (one Ray task per file when there are several).
The scan names the file and line of an encoding error or a malformed row, counts the rows
that ``data.on_bad_row: skip`` drops (Ray's reader skips exactly the same ones), lists each
file's columns and hashes its bytes for the fingerprint.
"""

from __future__ import annotations

from lepton_ray.config import DataConfig
from lepton_ray.data.sources.columns import required_columns, task_rows
from lepton_ray.data.sources.common import MAX_BAD_ROWS_KEPT, TASK_CPUS, Source, root_cause
from lepton_ray.data.sources.files import (
    FileScan,
    file_digests,
    parse_json_object,
    parse_jsonl_files,
    read_files,
    scan_file,
    skip_invalid_row,
)
from lepton_ray.data.sources.hub import (
    HF_CHUNK_ROWS,
    _hf_fingerprint,
    _load_hf,
    _read_hf,
    hf_to_ray,
)
from lepton_ray.data.sources.locate import SUFFIX_FORMATS, detect_format, is_uri, source_files
from lepton_ray.tasks import Task
from lepton_ray.text import as_strings

__all__ = [
    "HF_CHUNK_ROWS",
    "MAX_BAD_ROWS_KEPT",
    "SUFFIX_FORMATS",
    "TASK_CPUS",
    "FileScan",
    "Source",
    "as_strings",
    "detect_format",
    "file_digests",
    "fingerprint",
    "hf_to_ray",
    "is_uri",
    "parse_json_object",
    "parse_jsonl_files",
    "read_files",
    "read_source",
    "root_cause",
    "scan_file",
    "skip_invalid_row",
    "source_files",
    "task_rows",
]


def fingerprint(cfg: DataConfig) -> str:
    """sha256 over the source bytes (or the ``datasets`` fingerprint for data.hf): the same
    fingerprint means the same input data."""
    if cfg.hf is not None:
        return _hf_fingerprint(cfg, _load_hf(cfg))
    return file_digests(source_files(cfg.path))


def read_source(cfg: DataConfig, task: Task) -> Source:
    """Scan, then lazily read the source as a Ray Dataset of the task's rows (a
    classifier's ``text`` and ``label``; ``task.format_rows``).

    Raises:
        DataError: one line naming the file (and line) at fault, or the missing column.
    """
    required = required_columns(cfg, task)
    source = _read_hf(cfg, required) if cfg.hf is not None else read_files(cfg, required)
    source.ds = source.ds.map_batches(
        task_rows,
        num_cpus=TASK_CPUS,
        batch_format="pyarrow",
        zero_copy_batch=True,
        fn_kwargs=dict(task=task, data=cfg),
    )
    if cfg.max_rows:
        # The first max_rows rows in file order, the same ones every run (the cache's
        # fingerprint promises it): without preserve_order, limit keeps whichever blocks
        # reach it first. The setting is this dataset's own (its plan runs under it).
        source.ds.context.execution_options.preserve_order = True
        source.ds = source.ds.limit(cfg.max_rows)
    return source
