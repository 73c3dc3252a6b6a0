"""Storage roots that are either a local folder or an object-store URI (s3://, gs://, ...).

``cluster.storage_path`` may be a folder every node mounts or a bucket URI. A URI root is a
:class:`Uri`: it joins with ``/`` like a ``Path`` (so ``cfg.data_dir / "train"`` works for
both kinds), and :func:`resolve` gives the ``pyarrow.fs`` filesystem and the path inside it
that Ray Data, Ray Train and the manifest helpers here read and write with.

S3 settings come from the standard environment variables only, never from the YAML:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` (or any other source of
the AWS default credential chain), ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (an
S3-compatible server such as MinIO) and ``AWS_REGION``/``AWS_DEFAULT_REGION``. The filesystem
is built without explicit keys, so a pickled copy (a Ray task's) carries no secret: each
process reads the credentials from its own environment.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from urllib.parse import urlsplit

SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
"""URI schemes accepted as a storage root (what ``pyarrow.fs`` opens)."""

S3_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "MLFLOW_S3_ENDPOINT_URL",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
"""Object-store settings a Ray worker needs from the driver's environment (when set there)."""

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class Uri:
    """An object-store location, ``scheme://bucket/key``; joins like a ``Path``."""

    __slots__ = ("scheme", "path")

    def __init__(self, uri: str):
        scheme, sep, rest = str(uri).partition("://")
        if not sep or not scheme:
            raise ValueError(f"{uri}: not a URI (scheme://bucket/path)")
        self.scheme = scheme.lower()
        self.path = "/".join(p for p in rest.split("/") if p)

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Uri:
        return Uri(f"{self.scheme}://{self.path.rsplit('/', 1)[0]}") if "/" in self.path else self

    def __truediv__(self, part: str | os.PathLike) -> Uri:
        return Uri(f"{self}/{os.fspath(part)}")

    def joinpath(self, *parts: str) -> Uri:
        out = self
        for part in parts:
            out = out / part
        return out

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"Uri({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Uri) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


Location = Path | Uri


def is_uri(value: object) -> bool:
    return isinstance(value, Uri) or "://" in str(value)


def check_uri(value: str) -> str:
    """A storage-root URI, normalized; ValueError naming what is wrong with it."""
    uri = Uri(value)
    if uri.scheme not in SCHEMES:
        raise ValueError(
            f"{value}: unsupported scheme {uri.scheme}:// (supported: "
            + ", ".join(f"{s}://" for s in SCHEMES)
            + ", or a local folder)"
        )
    if not uri.bucket:
        raise ValueError(f"{value}: no bucket in the URI ({uri.scheme}://BUCKET/prefix)")
    return str(uri)


def location(value: str | os.PathLike | Uri) -> Location:
    """A ``Path`` for a local folder, a :class:`Uri` for ``scheme://...``."""
    if isinstance(value, (Path, Uri)):
        return value
    return Uri(str(value)) if "://" in str(value) else Path(value)


def s3_endpoint() -> str | None:
    """The S3 endpoint the environment names (an S3-compatible server), or None for AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(bucket: str | None = None, quick: bool = False):
    """``pyarrow.fs.S3FileSystem`` configured from the standard AWS environment variables.

    ``quick``: short timeouts and one retry, for the preflight check (an unreachable
    endpoint is an error in seconds, not after minutes of retries).

    One filesystem per setting, reused: every file of a split is opened through here, and
    building one (on AWS without a region, a region lookup over the network) per file would
    repeat that work for each.
    """
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    endpoint = s3_endpoint()
    # The bucket matters only where its region must be looked up.
    lookup = bucket if not endpoint and not region else None
    return _s3_filesystem(endpoint, region, lookup, quick)


@functools.lru_cache(maxsize=32)
def _s3_filesystem(endpoint: str | None, region: str | None, lookup: str | None, quick: bool):
    import pyarrow.fs as pafs

    kwargs: dict = {}
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        kwargs["scheme"] = parts.scheme or "https"
    elif lookup:
        region = pafs.resolve_s3_region(lookup)  # AWS itself: the bucket's region
    if region:
        kwargs["region"] = region
    if quick:
        kwargs.update(
            connect_timeout=5,
            request_timeout=15,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
        )
    else:
        kwargs["connect_timeout"] = 10
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: Uri, quick: bool = False):
    """The ``pyarrow.fs`` filesystem of a URI (S3 from the environment; others by scheme)."""
    import pyarrow.fs as pafs

    if uri.scheme == "s3":
        return s3_filesystem(uri.bucket, quick=quick)
    return pafs.FileSystem.from_uri(str(uri))[0]


def resolve(target: str | os.PathLike | Uri, quick: bool = False):
    """(filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    where = location(target)
    if isinstance(where, Uri):
        return filesystem(where, quick=quick), where.path
    return pafs.LocalFileSystem(), str(Path(where).absolute())


# ------------------------------------------------------------------ file operations (both kinds)
def exists(target: Location) -> bool:
    import pyarrow.fs as pafs

    fs, path = resolve(target)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(target: Location) -> bool:
    """A folder; on an object store, any object under the prefix makes one."""
    import pyarrow.fs as pafs

    if isinstance(target, Path):
        return target.is_dir()
    fs, path = resolve(target)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def is_file(target: Location) -> bool:
    import pyarrow.fs as pafs

    fs, path = resolve(target)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_text(target: Location) -> str:
    if isinstance(target, Path):
        return target.read_text()
    fs, path = resolve(target)
    with fs.open_input_stream(path) as handle:
        return handle.read().decode()


def write_text(target: Location, text: str) -> None:
    """Write a whole file (on an object store: one PUT, which appears at once or not at all)."""
    if isinstance(target, Path):
        target.write_text(text)
        return
    fs, path = resolve(target)
    with fs.open_output_stream(path) as handle:
        handle.write(text.encode())


def files(folder: Location, suffix: str = "", recursive: bool = True) -> list[str]:
    """The files under ``folder`` ending in ``suffix``, sorted: absolute paths for a local
    folder, URIs (``s3://bucket/key``) for an object store. Hidden files (``.name``) aside."""
    import pyarrow.fs as pafs

    fs, path = resolve(folder)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    found = [
        info.path
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
        and info.path.endswith(suffix)
        and not info.base_name.startswith(".")
    ]
    if isinstance(folder, Uri):
        return sorted(f"{folder.scheme}://{p}" for p in found)
    return sorted(found)


def parquet_files(folder: Location) -> list[str]:
    """A preprocessed split's (or replay folder's) Parquet files, sorted."""
    return files(folder, ".parquet")


def open_parquet(target: str | os.PathLike | Uri, **kwargs):
    """``pyarrow.parquet.ParquetFile`` of a local file or an object-store one."""
    import pyarrow.parquet as pq

    if not is_uri(target):
        return pq.ParquetFile(target, **kwargs)
    fs, path = resolve(target)
    return pq.ParquetFile(fs.open_input_file(path), **kwargs)


def write_parquet(table, target: str | os.PathLike | Uri) -> None:
    """Write a Parquet file, creating a local file's folder first."""
    import pyarrow.parquet as pq

    fs, path = resolve(target)
    if not is_uri(target):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=fs)


def remove_tree(target: Location) -> None:
    """Remove a folder and everything under it; nothing when it does not exist."""
    import shutil

    if isinstance(target, Path):
        shutil.rmtree(target, ignore_errors=True)
        return
    fs, path = resolve(target)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    # On an object store, a prefix with no object left is gone already.
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(path)


def makedirs(target: Location) -> None:
    """Create a local folder; on an object store, folders are only key prefixes."""
    if isinstance(target, Path):
        target.mkdir(parents=True, exist_ok=True)
