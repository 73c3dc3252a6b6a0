"""A real S3-compatible server on this machine: moto in server mode, bound to 127.0.0.1.

It runs as a process of its own with authentication on (``INITIAL_NO_AUTH_ACTION_COUNT``):
the first requests, unauthenticated, make an IAM user with an access key allowed everything
and the bucket; every later request must be signed with that key, so wrong credentials are
refused as a real S3 refuses them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request

from lepton_ray.runtime.cluster import free_port

SETUP_ACTIONS = 3  # create_user, create_access_key, put_user_policy


class S3Server:
    def __init__(self, bucket: str = "lepton"):
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.region = "us-east-1"
        self.key = self.secret = ""
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(SETUP_ACTIONS)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise TimeoutError("moto server did not answer within 60 s") from None
                time.sleep(0.2)
        iam = self.client("iam", key="setup", secret="setup")
        iam.create_user(UserName="lepton")
        access = iam.create_access_key(UserName="lepton")["AccessKey"]
        self.key, self.secret = access["AccessKeyId"], access["SecretAccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}  # fmt: skip
        iam.put_user_policy(UserName="lepton", PolicyName="all", PolicyDocument=json.dumps(policy))
        self.client("s3").create_bucket(Bucket=self.bucket)
        return self

    def client(self, service: str = "s3", key: str | None = None, secret: str | None = None):
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=key or self.key,
            aws_secret_access_key=secret or self.secret,
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2")
        return [
            o["Key"]
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix)
            for o in page.get("Contents", [])
        ]

    def env(self, base: dict[str, str] | None = None, **over: str) -> dict[str, str]:
        """``base`` (default: this process's environment) without any AWS or MLflow S3
        setting of the user's, plus this server's endpoint, region and credentials."""
        base = dict(os.environ if base is None else base)
        env = {k: v for k, v in base.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
        env.update(
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_REGION=self.region,
            AWS_ACCESS_KEY_ID=self.key,
            AWS_SECRET_ACCESS_KEY=self.secret,
            AWS_EC2_METADATA_DISABLED="true",
        )
        env.update(over)
        return env

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
