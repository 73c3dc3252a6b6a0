"""Shared storage on a multi-node cluster: checked on every node before a stage starts.

Ray Data tasks write the preprocessed shards, and Ray Train workers write checkpoints, on
whichever node they run; the driver and the other workers then read them by path. That only
works when the path is the same storage on every node (an NFS/EFS/Filestore mount, a bucket
mounted with gcsfuse or s3fs). A node-local folder would split a dataset across disks and
lose checkpoints, so on a cluster of two or more nodes the driver writes a marker file under
the storage root and one zero-CPU task pinned to each node looks for it (and for the data
files the config reads). A node that cannot see one is a single clear error, before any
stage starts.

An object-store root (``s3://bucket/prefix``) is shared by construction; what can go wrong
there is the endpoint, the credentials or the bucket, so :func:`check_object_store` reaches
the bucket from the driver (a metadata call, then a marker written and removed) and turns
each failure into one line naming the URI and the problem.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from lepton_ray.config import ExperimentConfig
from lepton_ray.errors import ConfigError, StageError
from lepton_ray.runtime.uri import Uri, is_uri, location, resolve, s3_endpoint

PROBE_TIMEOUT_S = 120.0
_CHECKED: set[tuple[str, ...]] = set()


def _visible(paths: list[str]) -> dict[str, bool]:
    return {p: os.path.exists(p) for p in paths}


def local_inputs(cfg: ExperimentConfig) -> dict[str, str]:
    """The data files the config reads by a local path (URIs and hub datasets excluded)."""
    found = {}
    if isinstance(cfg.data.path, Path) and not any(c in str(cfg.data.path) for c in "*?["):
        found["data.path"] = str(cfg.data.path)
    for split, path in cfg.data.split.files.items():
        if isinstance(path, Path):
            found[f"data.split.files.{split}"] = str(path)
    return found


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared_storage(cfg: ExperimentConfig, log=print) -> None:
    """On a cluster of two or more nodes: every node sees the storage root and the inputs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    root = cfg.storage_root
    inputs = local_inputs(cfg)
    key = (str(root), *sorted(inputs.values()), *sorted(n["NodeID"] for n in nodes))
    if key in _CHECKED:
        return
    shared = isinstance(root, Uri)  # an object store: every node reaches the same bucket
    if not inputs and shared:
        return
    marker = None
    if not shared:
        root.mkdir(parents=True, exist_ok=True)
        marker = root / f".lepton-probe-{uuid.uuid4().hex[:12]}"
        marker.write_text("written by the driver; every node must see it\n")
    probe = ray.remote(num_cpus=0, max_retries=0)(_visible)
    paths = ([str(marker)] if marker else []) + list(inputs.values())
    try:
        refs = {
            n["NodeID"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(paths)
            for n in nodes
        }
        try:
            seen = dict(zip(refs, ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S)))
        except ray.exceptions.GetTimeoutError:
            raise StageError(
                f"could not check shared storage on all {len(nodes)} nodes within "
                f"{PROBE_TIMEOUT_S:.0f} s (a node did not run the probe task)"
            ) from None
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
    address = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
    for node_id, answer in seen.items():
        where = f"node {address[node_id]} ({node_id[:8]})"
        if marker is not None and not answer[str(marker)]:
            setting = (
                f"cluster.storage_path ({root})"
                if cfg.cluster.storage_path
                else f"output_dir ({root}; cluster.storage_path is not set)"
            )
            raise StageError(
                f"this Ray cluster has {len(nodes)} nodes but {setting} is not shared: {where} "
                "cannot see a file the driver wrote there. Set cluster.storage_path to a "
                "folder every node mounts at the same path (NFS, EFS, Filestore, gcsfuse)"
            )
        for name, path in inputs.items():
            if not answer[path]:
                raise StageError(
                    f"{name} {path} is not on {where}: Ray Data reads it on every node. Put it "
                    "on storage every node mounts, or give a URI (s3://, gs://, hf://)"
                )
    _CHECKED.add(key)
    log(f"[ray] shared storage checked on {len(nodes)} nodes: {root}")


# ------------------------------------------------------------------------------ object stores
def storage_uris(cfg: ExperimentConfig) -> dict[str, str]:
    """The object-store locations a run writes to, by setting."""
    found = {}
    if is_uri(cfg.storage_root):
        found["cluster.storage_path"] = str(cfg.storage_root)
    artifacts = cfg.tracking.artifact_location
    if is_uri(artifacts) and artifacts.split("://", 1)[0].lower() in ("s3", "gs", "gcs"):
        found["tracking.artifact_location"] = artifacts
    return found


def check_storage(cfg: ExperimentConfig, log=print) -> None:
    """Every object-store location of the config answers (before Ray starts a stage)."""
    for setting, uri in storage_uris(cfg).items():
        check_object_store(uri, setting, log=log)


def check_object_store(uri: str, setting: str, log=print) -> None:
    """The endpoint answers, the credentials work, the bucket exists and takes a write.

    Raises:
        ConfigError: one line naming ``setting``, the URI and the problem.
    """
    import pyarrow.fs as pafs

    where = location(uri)
    key = ("object-store", str(where))
    if key in _CHECKED:
        return
    endpoint = s3_endpoint() if where.scheme == "s3" else None
    at = f" at {endpoint}" if endpoint else ""

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{setting} {where}: {problem}")

    try:
        fs, path = resolve(where, quick=True)
        if fs.get_file_info(where.bucket).type == pafs.FileType.NotFound:
            raise fail(f"bucket '{where.bucket}' does not exist{at}; create it first")
        marker = f"{path}/.lepton-probe-{uuid.uuid4().hex[:12]}"
        with fs.open_output_stream(marker) as handle:
            handle.write(b"written by lepton-ray's storage check\n")
        fs.delete_file(marker)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow reports every S3/GCS error as OSError
        raise fail(_store_problem(err, where, endpoint)) from None
    _CHECKED.add(key)
    log(f"[storage] {setting} {where}: reachable, bucket found, writable")


def _store_problem(err: Exception, where: Uri, endpoint: str | None) -> str:
    """What an object-store error means, in words (pyarrow's message names the AWS error)."""
    text = " ".join(str(err).split())
    if "NETWORK_CONNECTION" in text or "Could not resolve host" in text or "curlCode" in text:
        target = endpoint or f"the {where.scheme}:// service"
        source = " (AWS_ENDPOINT_URL)" if endpoint else ""
        detail = text.split("Details:", 1)[-1].strip() if "Details:" in text else text
        return f"cannot reach {target}{source}: {detail}"
    if any(
        code in text
        for code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")
    ):
        return (
            f"access denied to bucket '{where.bucket}': the credentials in the environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the AWS credential chain) are "
            "wrong, or may not read and write there"
        )
    if "NO_SUCH_BUCKET" in text:
        return f"bucket '{where.bucket}' does not exist; create it first"
    return f"cannot use it: {text.split(chr(10))[0]}"
