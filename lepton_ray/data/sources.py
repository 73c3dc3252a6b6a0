"""Readers: CSV, TSV, JSONL and Parquet files (or folders of them) into a Ray Dataset."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lepton_ray.config import DataConfig
from lepton_ray.errors import DataError

SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def source_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIX_FORMATS
        )
        if not files:
            raise DataError(f"data.path {path}: folder holds no CSV/TSV/JSONL/Parquet files")
        return files
    if not path.is_file():
        raise DataError(f"data.path: data file not found: {path}")
    return [path]


def detect_format(cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    suffixes = {SUFFIX_FORMATS.get(p.suffix.lower()) for p in source_files(cfg.path)}
    if None in suffixes or len(suffixes) != 1:
        raise DataError(
            f"data.path {cfg.path}: cannot tell the format from the suffix; set data.format to "
            "csv, tsv, jsonl or parquet"
        )
    return suffixes.pop()


def fingerprint(cfg: DataConfig) -> str:
    """sha256 over the source bytes: the same fingerprint means the same input data."""
    digest = hashlib.sha256()
    for path in source_files(cfg.path):
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _csv_parse_options(fmt: str):
    import pyarrow.csv as pacsv

    if fmt == "tsv":
        return pacsv.ParseOptions(delimiter="\t", quote_char=False)
    return pacsv.ParseOptions(newlines_in_values=True)


def check_rows(cfg: DataConfig, fmt: str) -> None:
    """Find a malformed row before Ray does, and name its file and line.

    A streaming pass in C++ (CSV/TSV) or line by line (JSONL): cheap next to tokenizing,
    and it turns a worker's traceback into one line the user can act on.
    """
    import json

    import pyarrow as pa
    import pyarrow.csv as pacsv

    for path in source_files(cfg.path):
        if fmt in ("csv", "tsv"):
            try:
                reader = pacsv.open_csv(
                    path,
                    parse_options=_csv_parse_options(fmt),
                    convert_options=pacsv.ConvertOptions(column_types={}, strings_can_be_null=True),
                    read_options=pacsv.ReadOptions(block_size=1 << 22),
                )
                for _ in reader:
                    pass
            except (pa.ArrowInvalid, UnicodeDecodeError) as err:
                raise DataError(
                    f"data.path {path}: malformed row: {str(err).splitlines()[0]}"
                ) from None
        elif fmt == "jsonl":
            with path.open(encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(
                            f"data.path {path}: malformed JSON on line {line_no}: {err.msg}"
                        ) from None
                    if not isinstance(row, dict):
                        raise DataError(f"data.path {path}: line {line_no} is not a JSON object")


def read_source(cfg: DataConfig):
    """A lazy Ray Dataset with exactly two columns, ``text`` and ``label``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray.data

    fmt = detect_format(cfg)
    check_rows(cfg, fmt)
    paths = [str(p) for p in source_files(cfg.path)]
    string_cols = {cfg.text_column: pa.string(), cfg.label_column: pa.string()}
    if fmt in ("csv", "tsv"):
        parse = _csv_parse_options(fmt)
        ds = ray.data.read_csv(
            paths,
            parse_options=parse,
            convert_options=pacsv.ConvertOptions(
                column_types=string_cols, strings_can_be_null=True
            ),
            file_extensions=None,
        )
    elif fmt == "jsonl":
        ds = ray.data.read_json(paths, lines=True, file_extensions=None)
    else:
        ds = ray.data.read_parquet(paths, file_extensions=None)

    columns = _columns(ds, cfg, fmt)
    for key, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if column not in columns:
            raise DataError(
                f"data.{key} '{column}' is not a column of {cfg.path}; its columns are: "
                f"{', '.join(columns)}"
            )
    ds = ds.select_columns([cfg.text_column, cfg.label_column])
    ds = ds.rename_columns({cfg.text_column: "text", cfg.label_column: "label"})
    if cfg.max_rows:
        ds = ds.limit(cfg.max_rows)
    return ds


def _columns(ds, cfg: DataConfig, fmt: str) -> list[str]:
    try:
        schema = ds.schema()
    except Exception as err:  # noqa: BLE001 - Ray wraps the reader's error; we name the file
        raise DataError(f"data.path {cfg.path}: cannot read as {fmt}: {root_cause(err)}") from None
    if schema is None:
        raise DataError(f"data.path {cfg.path}: the file holds no rows")
    return list(schema.names)


def root_cause(err: BaseException) -> str:
    """The innermost error message, on one line (Ray nests the reader's error)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    lines = [line for line in text if line.strip() and not line.startswith(("Traceback", "  "))]
    return (lines[-1] if lines else type(err).__name__)[:400]
