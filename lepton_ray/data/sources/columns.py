"""Column checks, and the task's rows (a classifier's ``text``/``label``) every source kind is
read into."""

from __future__ import annotations

from lepton_ray.config import DataConfig
from lepton_ray.errors import DataError
from lepton_ray.text import as_strings


def _split_column(cfg: DataConfig) -> list[str]:
    return [cfg.split.column] if cfg.split.column else []


def required_columns(cfg: DataConfig, task) -> list[tuple[str, list[str]]]:
    """(the YAML key that names them, columns) every file must have: the task's own
    (``task.source_columns``) and the split column."""
    return [*task.source_columns(cfg), ("data.split.column", _split_column(cfg))]


def check_columns(required: list[tuple[str, list[str]]], columns: list[str], where: str) -> None:
    for key, names in required:
        for column in names:
            if column not in columns:
                raise DataError(
                    f"{key} '{column}' is not a column of {where}; its columns are: "
                    f"{', '.join(columns)}"
                )


def task_rows(batch, task, data: DataConfig):
    """(in Ray Data tasks) Any batch -> the task's rows (``task.format_rows``: a classifier's
    ``text`` and ``label``), plus ``split`` (the split column's values, as written) when
    ``data.split.column`` names one."""
    table = task.format_rows(batch, data)
    if data.split.column:
        table = table.append_column("split", as_strings(batch, data.split.column))
    return table
