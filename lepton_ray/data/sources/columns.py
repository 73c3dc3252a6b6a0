"""Column checks and the ``text``/``label`` columns every source kind is read into."""

from __future__ import annotations

import json
from typing import Any

from lepton_ray.config import DataConfig
from lepton_ray.errors import DataError


def _split_column(cfg: DataConfig) -> list[str]:
    return [cfg.split.column] if cfg.split.column else []


def _required_columns(cfg: DataConfig) -> list[tuple[str, list[str]]]:
    return [
        ("data.text_column", cfg.text_columns),
        ("data.label_column", [cfg.label_column]),
        ("data.split.column", _split_column(cfg)),
    ]


def _check_columns(required: list[tuple[str, list[str]]], columns: list[str], where: str) -> None:
    for key, names in required:
        for column in names:
            if column not in columns:
                raise DataError(
                    f"{key} '{column}' is not a column of {where}; its columns are: "
                    f"{', '.join(columns)}"
                )


def _json_to_str(value: Any) -> str | None:
    # Matches pyarrow's cast to string, which read_json's columns go through.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def to_text_label(
    batch,
    text_columns: list[str],
    label_column: str | None,
    sep: str,
    split_column: str | None = None,
):
    """Any batch -> ``text`` (the text columns joined, blanks skipped) and ``label`` strings
    (none when ``label_column`` is None), plus ``split`` (the split column's values, as
    written) when ``split_column`` is given."""
    import pyarrow as pa
    import pyarrow.compute as pc

    texts = [as_strings(batch, c) for c in text_columns]
    if len(texts) == 1:
        text = texts[0]
    else:
        # Blanks count as missing; missing parts are skipped, and all missing stays missing
        # (null), as a lone column's empty cell would be.
        null = pa.scalar(None, pa.string())
        parts = [pc.if_else(pc.equal(t, ""), null, t) for t in texts]
        text = parts[0]
        for part in parts[1:]:
            text = pc.coalesce(pc.binary_join_element_wise(text, part, sep), text, part)
    columns = {"text": text}
    if label_column:
        columns["label"] = as_strings(batch, label_column)
    if split_column:
        columns["split"] = as_strings(batch, split_column)
    return pa.table(columns)


def as_strings(batch, column: str):
    """A column of a pyarrow batch as strings (all null where the batch lacks it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column not in batch.column_names:  # a JSONL block where no line has the key
        return pa.nulls(batch.num_rows, pa.string())
    values = batch.column(column)
    if pa.types.is_string(values.type):
        return values
    if pa.types.is_nested(values.type):
        return pa.array([_json_to_str(v) for v in values.to_pylist()], pa.string())
    return pc.cast(values, pa.string())
