"""Object-store storage roots without a server: URIs in the config, the paths every stage
derives from them, the local-folder helpers they share, and where the credentials go."""

from __future__ import annotations

from pathlib import Path

import pytest

from lepton_ray.config import validate_experiment
from lepton_ray.errors import ConfigError
from lepton_ray.runtime import uri
from lepton_ray.runtime.uri import Uri
from tests.conftest import smoke_config


def _cfg(tmp_path: Path, storage):
    data = tmp_path / "d.csv"
    data.write_text("review,sentiment\na,pos\n")
    raw = smoke_config(tmp_path, data)
    raw["cluster"]["storage_path"] = storage
    return validate_experiment(raw, "t")


def test_a_bucket_uri_is_a_storage_root_and_paths_join_inside_it(tmp_path):
    cfg = _cfg(tmp_path, "s3://bucket//team/runs/")
    assert cfg.cluster.storage_path == "s3://bucket/team/runs"
    assert cfg.storage_root == Uri("s3://bucket/team/runs")
    assert str(cfg.data_dir / "train") == "s3://bucket/team/runs/smoke/data/train"
    assert str(cfg.checkpoint_root) == "s3://bucket/team/runs/ray_results"
    assert cfg.data_dir.bucket == "bucket" and cfg.data_dir.path == "bucket/team/runs/smoke/data"
    assert cfg.data_dir.name == "data" and str(cfg.data_dir.parent) == "s3://bucket/team/runs/smoke"
    # The config round-trips through JSON (what workers and trials receive).
    again = validate_experiment(cfg.model_dump(mode="json"), "again")
    assert again.storage_root == cfg.storage_root


def test_a_local_folder_stays_a_path(tmp_path):
    cfg = _cfg(tmp_path, str(tmp_path / "shared"))
    assert cfg.storage_root == tmp_path / "shared"
    assert isinstance(cfg.data_dir, Path)
    assert _cfg(tmp_path, f"file://{tmp_path}/other").storage_root == tmp_path / "other"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ftp://host/x", "unsupported scheme ftp://"),
        ("s3://", "no bucket in the URI"),
        ("s3://KEY:SECRET@bucket/x", "credentials do not belong in cluster.storage_path"),
    ],
)
def test_a_bad_storage_uri_is_one_line(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        _cfg(tmp_path, value)
    assert "\n" not in str(err.value)
    assert "SECRET@" not in str(err.value)  # a URI's password is never echoed


def test_the_file_helpers_work_on_a_local_folder(tmp_path):
    folder = tmp_path / "a"
    uri.write_parquet(_table(), folder / "train" / "part-00001.parquet")
    uri.write_parquet(_table(), folder / "train" / "part-00000.parquet")
    uri.write_text(folder / "manifest.json", "{}")
    (folder / "train" / ".hidden.parquet").write_text("")
    assert uri.is_dir(folder / "train") and uri.is_file(folder / "manifest.json")
    assert uri.read_text(folder / "manifest.json") == "{}"
    assert uri.parquet_files(folder) == [
        str(folder / "train" / "part-00000.parquet"),
        str(folder / "train" / "part-00001.parquet"),
    ]
    assert uri.open_parquet(uri.parquet_files(folder)[0]).metadata.num_rows == 2
    uri.remove_tree(folder)
    assert not uri.exists(folder)


def _table():
    import pyarrow as pa

    return pa.table({"x": [1, 2]})


def test_s3_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    fs, path = uri.resolve(Uri("s3://bucket/prefix/x"))
    assert path == "bucket/prefix/x"
    assert fs.region == "eu-west-3"
    # No key is built into the filesystem: a pickled copy (a Ray task's) carries no secret.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-value")
    import pickle

    assert b"s3cret-value" not in pickle.dumps(uri.resolve(Uri("s3://bucket/p"))[0])


def test_workers_and_jobs_get_the_object_store_settings(tmp_path, monkeypatch):
    from lepton_ray.runtime.cluster import worker_env
    from lepton_ray.runtime.jobs import object_store_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    env = worker_env()
    assert env["AWS_ACCESS_KEY_ID"] == "AKIAEXAMPLE" and "AWS_SESSION_TOKEN" not in env
    bucket = _cfg(tmp_path, "s3://bucket/p")
    local = _cfg(tmp_path, str(tmp_path / "shared"))
    environ = {"AWS_ACCESS_KEY_ID": "k", "AWS_REGION": "r", "HOME": "/h"}
    assert object_store_env(bucket, environ) == {"AWS_ACCESS_KEY_ID": "k", "AWS_REGION": "r"}
    assert object_store_env(local, environ) == {}
