"""Local and URI files (CSV, TSV, JSONL, Parquet): scanned once, then read with Ray Data.

The scan names the file and line of an encoding error or a malformed row, counts the rows
that ``data.on_bad_row: skip`` drops (Ray's reader skips exactly the same ones), lists each
file's columns and hashes its bytes for the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton_ray.config import DataConfig
from lepton_ray.data.sources.columns import check_columns
from lepton_ray.data.sources.common import MAX_BAD_ROWS_KEPT, TASK_CPUS, Source, root_cause
from lepton_ray.data.sources.locate import _open, detect_format, filesystem, source_files
from lepton_ray.errors import DataError
from lepton_ray.text import json_to_str

_BLOCK = 1 << 22  # bytes per CSV block: one record must fit in it
_BOM = b"\xef\xbb\xbf"


# ------------------------------------------------------------------------------------ scanning
@dataclass
class FileScan:
    """What one pass over one file found."""

    file: str
    rows: int = 0
    columns: list[str] = field(default_factory=list)
    bad_rows: list[dict[str, Any]] = field(default_factory=list)
    n_bad: int = 0
    digest: str = ""
    error: str | None = None


class _HashingReader:
    """A read-only stream that hashes the bytes it hands out (one pass: scan and hash)."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.sha = hashlib.sha256()
        self.size = 0
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read() if n is None or n < 0 else self._stream.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self._stream.close()


def scan_file(file: str, fmt: str, header: bool, column_names: list[str] | None, stop: bool):
    """Scan one file; errors come back in ``FileScan.error`` (so a Ray task never raises)."""
    scan = FileScan(file=file)
    try:
        if fmt == "parquet":
            _scan_parquet(scan)
        else:
            reader = _HashingReader(_open(file))
            try:
                if fmt == "jsonl":
                    _scan_jsonl(scan, reader, stop)
                else:
                    _scan_csv(scan, reader, fmt, header, column_names, stop)
                reader.drain()
            finally:
                reader.close()
            if reader.size == 0 or (not scan.rows and not scan.n_bad and not scan.columns):
                raise DataError(f"data.path {file}: the file is empty")
            scan.digest = reader.sha.hexdigest()
    except DataError as err:
        scan.error = str(err)
    except Exception as err:  # noqa: BLE001 - any reader error becomes one line naming the file
        scan.error = f"data.path {file}: cannot read as {fmt}: {root_cause(err)}"
    return scan


def _csv_parse_options(fmt: str, handler=None):
    import pyarrow.csv as pacsv

    if fmt == "tsv":
        return pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=handler)
    return pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=handler)


def _csv_read_options(column_names: list[str] | None):
    import pyarrow.csv as pacsv

    return pacsv.ReadOptions(use_threads=False, block_size=_BLOCK, column_names=column_names)


def skip_invalid_row(row) -> str:
    """pyarrow ``invalid_row_handler`` of Ray's reader under ``data.on_bad_row: skip``."""
    return "skip"


class _BadRows:
    """pyarrow ``invalid_row_handler`` of the scan: counts, keeps the first few, may stop."""

    def __init__(self, stop: bool, quoted: bool) -> None:
        self.stop, self.quoted, self.n, self.kept = stop, quoted, 0, []

    def __call__(self, row) -> str:
        self.n += 1
        if len(self.kept) < MAX_BAD_ROWS_KEPT:
            reason = f"expected {row.expected_columns} fields, got {row.actual_columns}"
            if self.quoted and row.text.count('"') % 2:
                reason += " (a quote is never closed)"
            self.kept.append((row.number, reason))
        return "error" if self.stop else "skip"


def _scan_csv(scan: FileScan, reader, fmt: str, header: bool, names, stop: bool) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    bad = _BadRows(stop, quoted=fmt == "csv")
    try:
        if header:  # every column as a string: type inference could fail on a later block
            with _open(scan.file) as peek:
                names = pacsv.open_csv(
                    peek,
                    read_options=_csv_read_options(None),
                    parse_options=_csv_parse_options(fmt, skip_invalid_row),
                ).schema.names
        scan.columns = list(names)
        batches = pacsv.open_csv(
            reader,
            read_options=_csv_read_options(None if header else names),
            parse_options=_csv_parse_options(fmt, bad),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())),
        )
        for batch in batches:
            scan.rows += batch.num_rows
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        message = str(err)
        if isinstance(err, UnicodeDecodeError) or "UTF8" in message:
            raise DataError(utf8_error(scan.file)) from None
        if message.startswith("Empty CSV file"):
            raise DataError(f"data.path {scan.file}: the file is empty") from None
        if not (stop and bad.n):  # anything but the stop our handler asked for
            raise DataError(
                f"data.path {scan.file}: malformed row: {message.splitlines()[0]}"
            ) from None
    lines = _record_lines(scan.file, fmt, [number for number, _ in bad.kept])
    scan.n_bad = bad.n
    scan.bad_rows = [
        {"file": scan.file, "line": lines.get(number), "reason": reason}
        for number, reason in bad.kept
    ]
    if stop and bad.n:
        row = scan.bad_rows[0]
        raise DataError(
            f"data.path {scan.file}: malformed row on line {row['line']}: {row['reason']} "
            "(set data.on_bad_row: skip to drop such rows)"
        )


def _record_lines(file: str, fmt: str, numbers: list[int | None]) -> dict[int, int]:
    """Physical line where each CSV record starts (pyarrow numbers records, not lines)."""
    import csv

    wanted = {n for n in numbers if n is not None}
    if not wanted:
        return {}
    csv.field_size_limit(max(csv.field_size_limit(), _BLOCK))
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {"delimiter": ","}
    found, record = {}, 0
    with _open(file) as stream:
        lines = (line.decode("utf-8", "replace") for line in _byte_lines(stream))
        rows = csv.reader(lines, **dialect)
        try:
            while len(found) < len(wanted):
                before = rows.line_num
                if next(rows) == []:  # blank lines are no records, to pyarrow either
                    continue
                record += 1
                if record in wanted:
                    found[record] = before + 1
        except (StopIteration, csv.Error):
            pass
    return found


def _byte_lines(stream):
    """Lines of a byte stream, ``\\n`` kept, read 1 MiB at a time."""
    rest = b""
    while chunk := stream.read(1 << 20):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part + b"\n"
    if rest:
        yield rest


def utf8_error(file: str) -> str:
    """One line naming the file, line and byte where UTF-8 decoding fails."""
    with _open(file) as stream:
        for line_no, line in enumerate(_byte_lines(stream), start=1):
            try:
                (line.removeprefix(_BOM) if line_no == 1 else line).decode("utf-8")
            except UnicodeDecodeError as err:
                return _utf8_message(file, line_no, line, err)
    return f"data.path {file}: not UTF-8 text; re-save it as UTF-8"


def _utf8_message(file: str, line_no: int, line: bytes, err: UnicodeDecodeError) -> str:
    return (
        f"data.path {file}: line {line_no} is not UTF-8 text (byte {line[err.start]:#04x} at "
        f"column {err.start + 1}); re-save the file as UTF-8"
    )


def _scan_jsonl(scan: FileScan, reader, stop: bool) -> None:
    keys: dict[str, None] = {}
    for line_no, raw in enumerate(_byte_lines(reader), start=1):
        try:
            text = (raw.removeprefix(_BOM) if line_no == 1 else raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(_utf8_message(scan.file, line_no, raw, err)) from None
        if not text.strip():
            continue
        row, reason = parse_json_object(text)
        if reason is None:
            scan.rows += 1
            keys.update(dict.fromkeys(row))
            continue
        if stop:
            raise DataError(
                f"data.path {scan.file}: line {line_no} {reason} (set data.on_bad_row: skip to "
                "drop such lines)"
            )
        scan.n_bad += 1
        if len(scan.bad_rows) < MAX_BAD_ROWS_KEPT:
            scan.bad_rows.append({"file": scan.file, "line": line_no, "reason": reason})
    scan.columns = list(keys)


def parse_json_object(text: str) -> tuple[dict | None, str | None]:
    """(object, None) for a JSON object, else (None, why not)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"is not valid JSON: {err.msg} (column {err.colno})"
    if not isinstance(row, dict):
        return None, f"is not a JSON object (a {type(row).__name__})"
    return row, None


def _scan_parquet(scan: FileScan) -> None:
    import pyarrow.parquet as pq

    fs, path = filesystem(scan.file)
    with fs.open_input_file(path) as handle:
        meta = pq.ParquetFile(handle)
        scan.rows = meta.metadata.num_rows
        scan.columns = list(meta.schema_arrow.names)
    scan.digest = _file_digest(scan.file)


def _file_digest(file: str) -> str:
    with _open(file) as stream:
        reader = _HashingReader(stream)
        reader.drain()
        return reader.sha.hexdigest()


def _scan_all(cfg: DataConfig, files: list[str], fmt: str) -> list[FileScan]:
    args = (fmt, cfg.header, cfg.column_names, cfg.on_bad_row == "error")
    if len(files) == 1 or any(f.startswith("local://") for f in files):
        scans = [scan_file(f, *args) for f in files]
    else:
        import ray

        task = ray.remote(scan_file)
        try:
            scans = ray.get([task.remote(f, *args) for f in files])
        except Exception as err:  # noqa: BLE001 - a dead worker, say; name the source
            raise DataError(f"data.path {cfg.path}: scan failed: {root_cause(err)}") from None
    for scan in scans:
        if scan.error:
            raise DataError(scan.error)
    return scans


def _combine(named_digests: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for name, file_digest in named_digests:
        digest.update(Path(name).name.encode())
        digest.update(bytes.fromhex(file_digest))
    return digest.hexdigest()[:16]


def file_digests(files: Sequence[str]) -> str:
    """sha256 over the files' names and bytes, in the order given."""
    return _combine([(f, _file_digest(f)) for f in files])


# ------------------------------------------------------------------------------------- reading


def read_files(
    cfg: DataConfig,
    required: list[tuple[str, list[str]]],
    optional: Sequence[str] = (),
    include_paths: bool = False,
) -> Source:
    """Scan data.path's files, then read them lazily with Ray Data, as they are.

    Args:
        required: (the key that names them, columns) that every file must have
            (``columns.required_columns``: the task's and the split column).
        optional: more columns, read when every file has them.
        include_paths: add Ray's ``path`` column, the file each row comes from.

    Raises:
        DataError: one line naming the file (and line) at fault, or the missing column.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray.data

    files = source_files(cfg.path)
    fmt = detect_format(cfg, files)
    if not cfg.header and fmt not in ("csv", "tsv"):
        raise DataError(f"data.header and data.column_names apply to CSV and TSV, not {fmt}")
    scans = _scan_all(cfg, files, fmt)
    for scan in scans:
        check_columns(required, scan.columns, scan.file)
    found = [c for c in optional if all(c in scan.columns for scan in scans)]
    needed = list(dict.fromkeys([c for _, names in required for c in names] + found))
    n_rows, n_bad = sum(s.rows for s in scans), sum(s.n_bad for s in scans)
    if not n_rows and not n_bad:
        raise DataError(f"data.path {cfg.path}: the files hold no rows")
    # Ray keeps a local:// prefix (read on this node); other URIs and paths go as they are.
    paths = list(files)
    if fmt in ("csv", "tsv"):
        ds = ray.data.read_csv(
            paths,
            read_options=_csv_read_options(None if cfg.header else cfg.column_names),
            parse_options=_csv_parse_options(fmt, skip_invalid_row if n_bad else None),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(needed, pa.string()),
                include_columns=needed,
                strings_can_be_null=True,
            ),
            file_extensions=None,
            include_paths=include_paths,
            ray_remote_args={"num_cpus": TASK_CPUS},
        )
    elif fmt == "jsonl" and n_bad:
        # pyarrow's JSON reader cannot skip a line: parse lines ourselves, as the scan did.
        ds = ray.data.read_binary_files(
            paths,
            file_extensions=None,
            include_paths=include_paths,
            ray_remote_args={"num_cpus": TASK_CPUS},
        ).map_batches(
            parse_jsonl_files,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs=dict(columns=needed),
            num_cpus=TASK_CPUS,
        )
    elif fmt == "jsonl":
        ds = ray.data.read_json(
            paths,
            lines=True,
            file_extensions=None,
            include_paths=include_paths,
            ray_remote_args={"num_cpus": TASK_CPUS},
        )
    else:
        ds = ray.data.read_parquet(
            paths,
            columns=needed,
            file_extensions=None,
            include_paths=include_paths,
            ray_remote_args={"num_cpus": TASK_CPUS},
        )
    bad_rows = [row for scan in scans for row in scan.bad_rows][:MAX_BAD_ROWS_KEPT]
    digest = _combine([(s.file, s.digest) for s in scans])
    return Source(
        ds=ds,
        bad_rows=bad_rows,
        n_bad=n_bad,
        n_rows=n_rows,
        fingerprint=digest,
        files=files,
        columns=needed,
    )


def parse_jsonl_files(batch, columns: list[str]):
    """Whole JSONL files -> one string column per wanted key, lines that are no object dropped
    (and each row's file in ``path``, when the batch has Ray's ``path`` column).

    The scan's split (on ``\\n`` only): ``read_text`` would also split inside a JSON string
    at U+2028 or U+0085, which JSON allows unescaped.
    """
    import pyarrow as pa

    values: dict[str, list] = {c: [] for c in columns}
    has_paths = "path" in batch.column_names
    paths = batch.column("path").to_pylist() if has_paths else [None] * batch.num_rows
    row_paths: list[str] = []
    for data, path in zip(batch.column("bytes").to_pylist(), paths):
        for line in data.removeprefix(_BOM).decode("utf-8").split("\n"):
            if not line.strip():
                continue
            row, _ = parse_json_object(line)
            if row is None:
                continue
            for column in columns:
                values[column].append(json_to_str(row.get(column)))
            row_paths.append(path)
    if has_paths:
        values["path"] = row_paths
    return pa.table({c: pa.array(v, pa.string()) for c, v in values.items()})
