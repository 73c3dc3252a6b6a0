"""The ``cluster`` section: which Ray cluster runs the stages, and the shared storage root."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from lepton_ray.config.base import Section
from lepton_ray.runtime.uri import check_uri


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
    storage_path: Path | str | None = Field(
        None,
        description="Shared storage root: the preprocessed shards (<storage_path>/<name>/data) "
        "and Ray Train/Tune checkpoints (<storage_path>/ray_results) go here. Either a folder "
        "every node mounts at the same path (NFS, EFS, Filestore, gcsfuse, s3fs; checked on "
        "every node before a stage starts) or an object-store URI (s3://bucket/prefix, "
        "gs://bucket/prefix, any pyarrow.fs URI; the bucket, endpoint and credentials are "
        "checked before a stage starts). S3 settings come from the environment only "
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION), never from "
        "this file. None: output_dir, which is enough on one machine.",
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
            if str(value).startswith("file://"):
                return Path(str(value)[len("file://") :]).expanduser().resolve()
            if "@" in str(value).split("://", 1)[1].split("/", 1)[0]:
                raise ValueError(
                    "credentials do not belong in cluster.storage_path; set them in the "
                    "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
                )
            return check_uri(str(value))
        return Path(value).expanduser().resolve()
