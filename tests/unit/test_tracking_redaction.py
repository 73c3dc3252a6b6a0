"""What goes to MLflow carries no credentials."""

from pathlib import Path

from lepton_ray.config import validate_experiment
from lepton_ray.tracking.mlflow import redact_uri, redacted_config
from tests.conftest import smoke_config


def test_redact_uri_removes_userinfo_and_keeps_the_rest():
    assert redact_uri("https://alice:s3cret@mlflow.example.com:5000/x") == (
        "https://***@mlflow.example.com:5000/x"
    )
    assert redact_uri("postgresql://u:p@db/mlflow") == "postgresql://***@db/mlflow"
    assert redact_uri("sqlite:////tmp/mlruns/mlflow.db") == "sqlite:////tmp/mlruns/mlflow.db"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact_uri("see s3://key:secret@bucket/a and more") == "see s3://***@bucket/a and more"


def test_logged_config_has_no_password(tmp_path: Path):
    raw = smoke_config(tmp_path, Path(__file__))
    raw["tracking"]["tracking_uri"] = "https://alice:s3cret@mlflow.example.com"
    raw["tracking"]["artifact_location"] = "s3://AKIAKEY:topsecret@bucket/artifacts"
    logged = redacted_config(validate_experiment(raw))
    text = repr(logged)
    assert "s3cret" not in text and "topsecret" not in text and "AKIAKEY" not in text
    assert logged["tracking"]["tracking_uri"] == "https://***@mlflow.example.com"
