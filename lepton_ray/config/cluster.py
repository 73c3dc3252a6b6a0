"""The ``cluster`` section: which Ray cluster runs the stages, and the shared storage root."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from lepton_ray.config.base import Section


class ClusterSection(Section):
    address: str | None = Field(
        None,
        description="Ray address. None: RAY_ADDRESS, else a running local cluster, else an "
        "in-process one. 'local' always starts an in-process one.",
    )
    auth: Literal["disabled", "token"] = Field(
        "disabled", description="RAY_AUTH_MODE for this process (and the clusters it starts)."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of an in-process cluster.")
    serve_ingress: Literal["auto", "haproxy", "proxy"] = Field(
        "proxy",
        description="HTTP ingress of clusters lepton-ray starts: 'proxy' (Ray Serve's Python "
        "proxy), 'haproxy' (Ray Serve's HAProxy ingress: about 1.9x the requests/s at 32 "
        "clients, but in Ray 2.60 a redeploy, which is how a model swap reaches the replicas, "
        "makes it answer 404 for seconds), 'auto' (haproxy where its binary is installed). A "
        "cluster started elsewhere keeps the ingress it was started with.",
    )
    storage_path: Path | None = Field(
        None,
        description="Shared storage root: the preprocessed shards (<storage_path>/<name>/data) "
        "and Ray Train/Tune checkpoints (<storage_path>/ray_results) go here. On a multi-node "
        "cluster it must be a folder every node mounts at the same path (NFS, EFS, Filestore, "
        "a bucket mounted with gcsfuse or s3fs); this is checked on every node before a stage "
        "starts. None: output_dir, which is enough on one machine.",
    )
    wait_for_resources: bool = Field(
        False,
        description="Wait when the cluster lacks free CPUs/GPUs for the workers (autoscaling "
        "clusters); by default such a run stops at once and says what holds them.",
    )

    @field_validator("storage_path", mode="before")
    @classmethod
    def _absolute_storage(cls, value: Any) -> Any:
        if value is None:
            return None
        if "://" in str(value):
            raise ValueError(
                f"{value}: URIs are not supported as cluster.storage_path yet (the shards are "
                "written with file APIs); mount the bucket on every node (gcsfuse, s3fs, "
                "mountpoint-s3) and give the mount's path"
            )
        return Path(value).expanduser().resolve()
