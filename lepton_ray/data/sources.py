"""Sources: files, folders, globs or storage URIs (CSV, TSV, JSONL, Parquet), or a Hugging
Face ``datasets`` split, read into a Ray Dataset of two string columns, ``text`` and ``label``.

Every file is scanned once before Ray reads it (one Ray task per file when there are several).
The scan names the file and line of an encoding error or a malformed row, counts the rows
that ``data.on_bad_row: skip`` drops (Ray's reader skips exactly the same ones), lists each
file's columns and hashes its bytes for the fingerprint.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_ray.config import DATA_SUFFIXES, DataConfig
from lepton_ray.errors import DataError

if TYPE_CHECKING:
    import ray.data

SUFFIX_FORMATS = DATA_SUFFIXES

MAX_BAD_ROWS_KEPT = 100
"""Bad rows listed with file, line and reason; all of them are counted."""

_BLOCK = 1 << 22  # bytes per CSV block: one record must fit in it
_BOM = b"\xef\xbb\xbf"


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


# ------------------------------------------------------------------------------ locating files
def is_uri(path: Path | str | None) -> bool:
    return isinstance(path, str) and "://" in path


def source_files(path: Path | str) -> list[str]:
    """The files a ``data.path`` names: a file, a folder (recursively), a glob or a URI."""
    if is_uri(path):
        return _uri_files(str(path))
    path = Path(path)
    if any(char in str(path) for char in "*?["):
        matches = sorted(glob.glob(str(path), recursive=True))
        files = [f for m in matches for f in (_folder_files(Path(m)) if Path(m).is_dir() else [m])]
        files = [f for f in files if Path(f).is_file()]
        if not files:
            raise DataError(f"data.path: no file matches the glob {path}")
        return files
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise DataError(f"data.path {path}: folder holds no CSV/TSV/JSONL/Parquet files")
        return files
    if not path.is_file():
        raise DataError(f"data.path: data file not found: {path}")
    return [str(path)]


def _folder_files(folder: Path) -> list[str]:
    return sorted(
        str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIX_FORMATS
    )


def _uri_files(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    scheme, rest = uri.split("://", 1)
    glob_at = min((rest.find(c) for c in "*?[" if c in rest), default=-1)
    root = (rest if glob_at < 0 else rest[:glob_at].rsplit("/", 1)[0]).rstrip("/")
    try:
        fs, base = _filesystem(f"{scheme}://{root}")
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File and glob_at < 0:
            return [uri]
        if info.type != pafs.FileType.Directory:
            raise DataError(f"data.path: nothing found at {uri}")
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow's error types differ per filesystem
        raise DataError(f"data.path {uri}: cannot list it: {root_cause(err)}") from None
    # The filesystem's paths lack the scheme: rebuild the URIs the user would type.
    files = [
        f"{scheme}://{root}{item.path[len(base.rstrip('/')) :]}"
        for item in infos
        if item.type == pafs.FileType.File
    ]
    if glob_at >= 0:
        pattern = _glob_regex(uri)
        files = [f for f in files if pattern.fullmatch(f)]
    else:
        files = [f for f in files if Path(f).suffix.lower() in SUFFIX_FORMATS]
    if not files:
        raise DataError(f"data.path {uri}: no CSV/TSV/JSONL/Parquet file found there")
    return sorted(files)


def _glob_regex(pattern: str):
    """A glob as the shell reads it: ``*`` and ``?`` stay inside a folder, ``**/`` spans any."""
    import re

    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _filesystem(uri: str):
    """(pyarrow filesystem, path in it); ``local://`` is Ray's name for the driver's disk."""
    import pyarrow.fs as pafs

    if uri.startswith("local://"):
        return pafs.LocalFileSystem(), "/" + uri[len("local://") :].lstrip("/")
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    return pafs.FileSystem.from_uri(uri)


def _open(file: str):
    fs, path = _filesystem(file)
    return fs.open_input_stream(path)


def detect_format(cfg: DataConfig, files: list[str] | None = None) -> str:
    """``data.format``, or the format every file's suffix agrees on (``hf`` for data.hf)."""
    if cfg.hf is not None:
        return "hf"
    if cfg.format != "auto":
        return cfg.format
    files = files if files is not None else source_files(cfg.path)
    suffixes = {SUFFIX_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in suffixes or len(suffixes) != 1:
        raise DataError(
            f"data.path {cfg.path}: cannot tell the format from the suffix; set data.format to "
            "csv, tsv, jsonl or parquet"
        )
    return suffixes.pop()


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
            raise DataError(_utf8_error(scan.file)) from None
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


def _utf8_error(file: str) -> str:
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

    fs, path = _filesystem(scan.file)
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


def fingerprint(cfg: DataConfig) -> str:
    """sha256 over the source bytes (or the ``datasets`` fingerprint for data.hf): the same
    fingerprint means the same input data."""
    if cfg.hf is not None:
        return _hf_fingerprint(cfg, _load_hf(cfg))
    return file_digests(source_files(cfg.path))


def file_digests(files: Sequence[str]) -> str:
    """sha256 over the files' names and bytes, in the order given."""
    return _combine([(f, _file_digest(f)) for f in files])


# ------------------------------------------------------------------------------------- reading
TASK_CPUS = 0.5
"""CPUs per read or map task of the data stage: with the tokenizer actors at 0.5 each, no
task needs a whole CPU, so actors spread over small nodes can never starve the reads."""


def read_source(cfg: DataConfig) -> Source:
    """Scan, then lazily read the source as a Ray Dataset of ``text`` and ``label``.

    Raises:
        DataError: one line naming the file (and line) at fault, or the missing column.
    """
    source = _read_hf(cfg) if cfg.hf is not None else read_files(cfg)
    source.ds = source.ds.map_batches(
        to_text_label,
        num_cpus=TASK_CPUS,
        batch_format="pyarrow",
        zero_copy_batch=True,
        fn_kwargs=dict(
            text_columns=cfg.text_columns,
            label_column=cfg.label_column,
            sep=cfg.text_join,
            split_column=cfg.split.column,
        ),
    )
    if cfg.max_rows:
        # The first max_rows rows in file order, the same ones every run (the cache's
        # fingerprint promises it): without preserve_order, limit keeps whichever blocks
        # reach it first. The setting is this dataset's own (its plan runs under it).
        source.ds.context.execution_options.preserve_order = True
        source.ds = source.ds.limit(cfg.max_rows)
    return source


def read_files(
    cfg: DataConfig,
    required: list[tuple[str, list[str]]] | None = None,
    optional: Sequence[str] = (),
    include_paths: bool = False,
) -> Source:
    """Scan data.path's files, then read them lazily with Ray Data, as they are.

    Args:
        required: (the key that names them, columns) that every file must have; default:
            data.text_column, data.label_column and data.split.column.
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
    required = _required_columns(cfg) if required is None else required
    for scan in scans:
        _check_columns(required, scan.columns, scan.file)
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
                values[column].append(_json_to_str(row.get(column)))
            row_paths.append(path)
    if has_paths:
        values["path"] = row_paths
    return pa.table({c: pa.array(v, pa.string()) for c, v in values.items()})


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


# ------------------------------------------------------------------------ Hugging Face datasets
def _load_hf(cfg: DataConfig):
    import datasets

    hf = cfg.hf
    try:
        if _is_saved_dataset(hf.name):
            loaded = datasets.load_from_disk(hf.name)
            if isinstance(loaded, datasets.DatasetDict):
                if hf.split not in loaded:
                    raise DataError(
                        f"data.hf.split '{hf.split}' is not a split of {hf.name}; its splits "
                        f"are: {', '.join(loaded)}"
                    )
                loaded = loaded[hf.split]
            return loaded
        return datasets.load_dataset(hf.name, hf.config, split=hf.split, data_files=hf.data_files)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types; one line names it
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, UnicodeDecodeError) and hf.data_files:
            for file in _local_data_files(hf.data_files):
                message = _utf8_error(file)
                if "line" in message:
                    raise DataError(message) from None
        raise DataError(f"data.hf {cfg.source_name}: cannot load it: {root_cause(err)}") from None


def _is_saved_dataset(name: str) -> bool:
    folder = Path(name)
    return folder.is_dir() and any(
        (folder / marker).is_file() for marker in ("state.json", "dataset_dict.json")
    )


def _local_data_files(data_files: Any) -> list[str]:
    items = data_files.values() if isinstance(data_files, dict) else [data_files]
    flat = [f for item in items for f in ([item] if isinstance(item, str) else item)]
    return [f for pattern in flat if not is_uri(pattern) for f in sorted(glob.glob(pattern))]


def _hf_fingerprint(cfg: DataConfig, loaded) -> str:
    key = json.dumps([cfg.hf.model_dump(mode="json"), loaded._fingerprint], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _read_hf(cfg: DataConfig) -> Source:
    loaded = _load_hf(cfg)
    _check_columns(_required_columns(cfg), list(loaded.column_names), cfg.source_name)
    if len(loaded) == 0:
        raise DataError(f"data.hf {cfg.source_name}: the split holds no rows")
    return Source(
        ds=hf_to_ray(loaded, from_hub=_from_hub(cfg), max_rows=cfg.max_rows),
        n_rows=len(loaded),
        fingerprint=_hf_fingerprint(cfg, loaded),
    )


def _from_hub(cfg: DataConfig) -> bool:
    from datasets import config as hf_config
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    local = cfg.hf.name in _PACKAGED_DATASETS_MODULES or Path(cfg.hf.name).exists()
    return not local and not hf_config.HF_HUB_OFFLINE


HF_CHUNK_ROWS = 50_000
"""Rows of a local Hugging Face dataset put into the object store at a time."""


def hf_to_ray(loaded, from_hub: bool, max_rows: int | None = None, chunk_rows: int = HF_CHUNK_ROWS):
    """``ray.data.from_huggingface`` for a hub dataset (a distributed read of the hub's
    Parquet files where it has them); a local one goes straight to Arrow, which is what
    from_huggingface falls back to after probing the hub, a probe that reloads the builder
    without its data files and cannot work offline.

    A local dataset goes ``chunk_rows`` at a time (slices of its memory-mapped Arrow files)
    into the object store, its first ``max_rows`` rows only: the driver holds one chunk,
    never the split.
    """
    import ray
    import ray.data

    if from_hub:
        return ray.data.from_huggingface(loaded)
    table = loaded.with_format("arrow")
    rows = len(loaded) if max_rows is None else min(max_rows, len(loaded))
    refs = [
        ray.put(table[start : min(start + chunk_rows, rows)])
        for start in range(0, rows, chunk_rows)
    ]
    return ray.data.from_arrow_refs(refs)


def root_cause(err: BaseException) -> str:
    """The innermost error message, on one line (Ray nests the reader's error)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    lines = [line for line in text if line.strip() and not line.startswith(("Traceback", "  "))]
    return (lines[-1] if lines else type(err).__name__)[:400]
