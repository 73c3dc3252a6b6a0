"""The job client's pure parts: where the token and the address come from, the runtime env."""

from __future__ import annotations

import pytest

from lepton_ray.errors import LeptonError
from lepton_ray.runtime import jobs
from tests.conftest import ROOT


def test_token_sources_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert jobs.find_token() == (None, "")
    assert jobs.auth_headers("auto") == {}
    with pytest.raises(LeptonError, match="--auth token: no token found"):
        jobs.auth_headers("token")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home\n")
    assert jobs.find_token()[0] == "home"
    named = tmp_path / "t"
    named.write_text("file")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert jobs.find_token() == ("file", str(named))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env")
    assert jobs.auth_headers("token") == {"Authorization": "Bearer env"}
    assert jobs.auth_headers("disabled") == {}


def test_address_must_be_the_dashboard_url(monkeypatch):
    monkeypatch.delenv("RAY_JOB_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert jobs.job_address(None) == jobs.DEFAULT_ADDRESS
    assert jobs.job_address("http://head:8265/") == "http://head:8265"
    with pytest.raises(LeptonError, match="dashboard's HTTP address"):
        jobs.job_address("head:6379")


def test_runtime_env_ships_the_project_without_runs_or_virtualenvs():
    env = jobs.runtime_env(ROOT)
    assert env["working_dir"] == str(ROOT / ".")
    for pattern in (".venv", "outputs", "mlruns", ".git"):
        assert pattern in env["excludes"]
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"


def test_a_job_is_described_without_the_credentials_of_its_set_values():
    from ray.job_submission import JobDetails, JobStatus, JobType

    uri = "https://alice:s3cret@mlflow.example.com"
    entrypoint = f"python -m lepton_ray run c.yaml --set tracking.tracking_uri={uri}"
    job = JobDetails(
        type=JobType.SUBMISSION,
        submission_id="lepton-c-1",
        status=JobStatus.FAILED,
        entrypoint=entrypoint,
        message=f"Job entrypoint command failed: {entrypoint}",
        start_time=1_700_000_000_000,
    )
    row = jobs.describe(job)
    assert "s3cret" not in repr(row) and "alice" not in repr(row)
    assert row["entrypoint"].endswith("tracking.tracking_uri=https://***@mlflow.example.com")
    assert row["status"] == "FAILED" and row["id"] == "lepton-c-1"


def test_the_job_runs_a_known_command():
    with pytest.raises(LeptonError, match="--command must be one of run, validate"):
        jobs.submit(ROOT / "experiments" / "quickstart_smoke.yaml", command="serve", project=ROOT)
