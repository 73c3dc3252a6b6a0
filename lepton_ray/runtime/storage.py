"""Shared storage on a multi-node cluster: checked on every node before a stage starts.

Ray Data tasks write the preprocessed shards, and Ray Train workers write checkpoints, on
whichever node they run; the driver and the other workers then read them by path. That only
works when the path is the same storage on every node (an NFS/EFS/Filestore mount, a bucket
mounted with gcsfuse or s3fs). A node-local folder would split a dataset across disks and
lose checkpoints, so on a cluster of two or more nodes the driver writes a marker file under
the storage root and one zero-CPU task pinned to each node looks for it (and for the data
files the config reads). A node that cannot see one is a single clear error, before any
stage starts.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from lepton_ray.config import ExperimentConfig
from lepton_ray.errors import StageError

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
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".lepton-probe-{uuid.uuid4().hex[:12]}"
    marker.write_text("written by the driver; every node must see it\n")
    probe = ray.remote(num_cpus=0, max_retries=0)(_visible)
    paths = [str(marker), *inputs.values()]
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
        marker.unlink(missing_ok=True)
    address = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
    for node_id, answer in seen.items():
        where = f"node {address[node_id]} ({node_id[:8]})"
        if not answer[str(marker)]:
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
