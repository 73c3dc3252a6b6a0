"""Locating a ``data.path``'s files (a file, a folder, a glob or a URI) and their format."""

from __future__ import annotations

import glob
from pathlib import Path

from lepton_ray.config import DATA_SUFFIXES, DataConfig
from lepton_ray.data.sources.common import root_cause
from lepton_ray.errors import DataError

SUFFIX_FORMATS = DATA_SUFFIXES


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
        fs, base = filesystem(f"{scheme}://{root}")
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


def filesystem(uri: str):
    """(pyarrow filesystem, path in it); ``local://`` is Ray's name for the driver's disk."""
    import pyarrow.fs as pafs

    if uri.startswith("local://"):
        return pafs.LocalFileSystem(), "/" + uri[len("local://") :].lstrip("/")
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    return pafs.FileSystem.from_uri(uri)


def _open(file: str):
    fs, path = filesystem(file)
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
