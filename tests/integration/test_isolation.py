"""The suite never touches a Ray cluster the user has running (the quickstart's, say)."""

import os
from pathlib import Path

from lepton_ray.runtime.cluster import local_cluster_address, ray_temp_root
from tests.conftest import TEST_RAY_TMP


def test_the_session_ray_lives_in_a_private_temp_folder(ray_session):
    node = ray_session._private.worker.global_worker.node
    assert Path(node.get_session_dir_path()).is_relative_to(TEST_RAY_TMP)
    user_file = Path("/tmp/ray/ray_current_cluster")
    if user_file.is_file() and user_file.read_text().strip():
        # A user's cluster is up on this machine right now: we are not attached to it.
        assert ray_session.get_runtime_context().gcs_address != user_file.read_text().strip()
    assert os.environ["RAY_ADDRESS"] == ray_session.get_runtime_context().gcs_address


def test_a_user_cluster_in_the_default_temp_folder_is_not_found(tmp_path, monkeypatch):
    fake = tmp_path / "user"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    monkeypatch.setenv("RAY_TMPDIR", str(TEST_RAY_TMP))
    assert ray_temp_root() == TEST_RAY_TMP / "ray"
    assert local_cluster_address() is None
    monkeypatch.setenv("RAY_TMPDIR", str(fake))
    assert ray_temp_root() == fake / "ray"


def test_workers_query_the_state_api_of_their_own_ray(ray_session):
    """Ray Train's placement-group cleaner runs in a worker and asks the State API which
    actors live; with a second Ray on the machine an unpinned lookup fails and leaks CPUs."""

    @ray_session.remote(num_cpus=0)
    def api_server_seen_by_a_worker() -> str:
        from ray.dashboard.utils import get_address_for_submission_client

        return get_address_for_submission_client(None)

    seen = ray_session.get(api_server_seen_by_a_worker.remote())
    assert seen == os.environ["RAY_API_SERVER_ADDRESS"]
    assert seen.startswith("http://127.0.0.1:")


def test_cli_workers_are_pinned_too(monkeypatch):
    from lepton_ray.runtime.cluster import API_SERVER_ENV, worker_env

    monkeypatch.delenv(API_SERVER_ENV, raising=False)
    assert worker_env("http://127.0.0.1:8265")[API_SERVER_ENV] == "http://127.0.0.1:8265"
    monkeypatch.setenv(API_SERVER_ENV, "http://127.0.0.1:1234")
    assert worker_env()[API_SERVER_ENV] == "http://127.0.0.1:1234"
