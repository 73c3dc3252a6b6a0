"""The model registry against a real MLflow store: versions with lineage, the promotion gate,
rollback, legacy alias migration (by writes only), the `models` CLI, and every version loadable
as a standard MLflow pyfunc model with its signature (Python API and `mlflow models predict`)
with no lepton-ray code. The gate with the real evaluator: test_gate_evaluator.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lepton_ray.cli import app
from lepton_ray.errors import StageError
from lepton_ray.registry import versions
from lepton_ray.tracking.mlflow import get_version_by_alias
from tests.conftest import TINY_LABELS, mlflow_store, register_tiny

runner = CliRunner()


@pytest.fixture
def store(tmp_path):
    return mlflow_store(tmp_path)


def _champion(store) -> str | None:
    found = get_version_by_alias(store["uri"], "reg", versions.CHAMPION)
    return str(found.version) if found else None


def test_gate_promote_and_rollback(store, tiny_artifact):
    uri, quiet = store["uri"], (lambda _: None)
    v1 = register_tiny(store, tiny_artifact, 0.80)
    version = store["client"].get_model_version("reg", v1)
    assert version.tags["lepton.metric.val_accuracy"] == "0.8"
    assert version.tags["lepton.config_hash"] == "c0ffee"
    assert version.tags["lepton.run_id"] == version.run_id
    assert store["client"].get_model_version_by_alias("reg", "challenger").version == int(v1)

    assert versions.promote(uri, "reg", v1, log=quiet).passed  # no champion yet
    assert _champion(store) == v1
    assert "challenger" not in store["client"].get_registered_model("reg").aliases

    v2 = register_tiny(store, tiny_artifact, 0.78)
    refused = versions.promote(uri, "reg", v2, log=quiet)
    assert not refused.passed and "0.7800" in refused.reason and "0.8000" in refused.reason
    assert _champion(store) == v1  # unchanged
    # Within the tolerance it passes.
    assert versions.promote(uri, "reg", v2, tolerance=0.03, log=quiet).passed
    assert _champion(store) == v2

    # Rollback goes back one champion at a time, then refuses, leaving the alias alone.
    assert versions.rollback(uri, "reg", log=quiet) == v1
    assert _champion(store) == v1
    with pytest.raises(StageError, match="no previous champion"):
        versions.rollback(uri, "reg", log=quiet)
    assert _champion(store) == v1


def test_gate_needs_one_split(store, tiny_artifact):
    """Without the experiment's data the gate cannot score versions of two splits: refused."""
    uri, quiet = store["uri"], (lambda _: None)
    v1 = register_tiny(store, tiny_artifact, 0.70)
    versions.promote(uri, "reg", v1, log=quiet)
    v2 = register_tiny(store, tiny_artifact, 0.99, split="fingerprint-b:validation")
    result = versions.promote(uri, "reg", v2, log=quiet)
    assert not result.passed and "different splits" in result.reason
    assert _champion(store) == v1


def test_a_compression_of_the_champion_is_gated_by_max_drop_not_by_tolerance(store, tiny_artifact):
    uri, quiet = store["uri"], (lambda _: None)
    v1 = register_tiny(store, tiny_artifact, 0.90)
    versions.promote(uri, "reg", v1, log=quiet)
    v2 = register_tiny(store, tiny_artifact, 0.895, quantization="dynamic_int8", source_version=v1)
    result = versions.promote(uri, "reg", v2, log=quiet)
    assert result.passed and "compression of champion" in result.reason
    assert store["client"].get_model_version("reg", v2).tags["lepton.source_version"] == v1


def test_reads_leave_a_legacy_registry_as_it_is_and_writes_migrate_it(store, tiny_artifact):
    uri, c = store["uri"], store["client"]
    v1 = register_tiny(store, tiny_artifact, 0.9)
    v2 = register_tiny(store, tiny_artifact, 0.89, quantization="dynamic_int8", source_version=v1)
    c.set_registered_model_alias("reg", "champion", v1)  # the old layout
    c.set_registered_model_alias("reg", "serving", v2)
    before = dict(c.get_registered_model("reg").aliases)
    for args in (["models", "list"], ["models", "list", "reg"], ["models", "show", "reg"]):
        result = runner.invoke(app, [*args, "--tracking-uri", uri])
        assert result.exit_code == 0, result.output
    assert str(versions.resolve(uri, "reg").version) == v1  # NAME means NAME@champion
    assert dict(c.get_registered_model("reg").aliases) == before  # reads wrote nothing
    # A write migrates first: @champion moves to the served compression, @serving goes, and
    # rollback knows the old champion.
    assert versions.rollback(uri, "reg", log=lambda _: None) == v1
    aliases = c.get_registered_model("reg").aliases
    assert str(aliases.get("champion")) == v1 and "serving" not in aliases
    assert versions.history(uri, "reg") == [v1]


def test_models_cli(store, tiny_artifact):
    uri = store["uri"]
    v1 = register_tiny(store, tiny_artifact, 0.8)
    v2 = register_tiny(store, tiny_artifact, 0.7)
    base = ["--tracking-uri", uri]

    result = runner.invoke(app, ["models", "promote", f"reg/{v1}", *base])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["models", "promote", "reg@challenger", *base])
    assert result.exit_code == 1 and "not promoted" in result.output
    assert _champion(store) == v1

    listing = runner.invoke(app, ["models", "list", *base])
    assert listing.exit_code == 0, listing.output
    lines = [line for line in listing.output.splitlines() if line.startswith("reg ")]
    assert len(lines) == 2 and "@champion" in lines[1] and "@challenger" in lines[0]

    shown = runner.invoke(app, ["models", "show", "reg", *base])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output[shown.output.index("{") :])
    assert info["version"] == v1 and info["aliases"] == ["champion"]
    assert info["metrics"]["val_accuracy"] == "0.8"

    # Bad input: one line, non-zero exit, registry unchanged.
    for args, needle in (
        (["models", "promote", "reg/99", *base], "has no version 99"),
        (["models", "promote", "nope/1", *base], "no registered model 'nope'"),
        (["models", "rollback", "reg", *base], "no previous champion"),
        (["models", "show", "reg@@", *base], "must look like"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output
    assert _champion(store) == v1 and v2


@pytest.fixture
def reader(store, monkeypatch):
    """MLflow pointed at the store as a reader would; undone after the test (MLflow keeps the
    URIs in module globals, which every later MlflowClient without URIs would inherit)."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store["uri"])
    return store


def test_a_registered_version_carries_its_signature(reader, tiny_artifact):
    """MLflow shows the input and output schema and enforces the input's."""
    import mlflow.models
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    v1 = register_tiny(reader, tiny_artifact, 0.8)
    signature = mlflow.models.get_model_info(f"models:/reg/{v1}").signature
    assert signature is not None
    assert [(i.type.name, i.name) for i in signature.inputs.inputs] == [("string", None)]
    outputs = [(o.name, o.type.name) for o in signature.outputs.inputs]
    assert outputs == [
        ("label", "string"),
        ("truncated", "boolean"),
        ("prob_negative", "double"),
        ("prob_positive", "double"),
    ]
    model = mlflow.pyfunc.load_model(f"models:/reg/{v1}")
    assert model.metadata.get_input_schema() == signature.inputs
    assert len(model.predict(pd.DataFrame({"text": ["a fine lamp"]}))) == 1
    with pytest.raises(MlflowException, match="Incompatible input types"):
        model.predict(pd.DataFrame({"text": [1, 2]}))  # not texts: refused by the schema


def test_a_version_is_a_standard_mlflow_model(reader, tiny_artifact, tmp_path):
    """MLflow's own API and CLI load the champion and classify raw texts."""
    import mlflow.pyfunc

    store = reader
    v1 = register_tiny(store, tiny_artifact, 0.8)
    versions.promote(store["uri"], "reg", v1, log=lambda _: None)
    model = mlflow.pyfunc.load_model("models:/reg@champion")
    out = model.predict(["a fine lamp", "x " * 40])
    assert list(out.columns) == ["label", "truncated", "prob_negative", "prob_positive"]
    assert set(out["label"]) <= set(TINY_LABELS)
    assert out["truncated"].tolist() == [False, True]  # max_length 16
    assert (out[["prob_negative", "prob_positive"]].sum(axis=1).round(4) == 1.0).all()

    # The CLI, in a clean process that imports nothing of lepton-ray itself.
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps({"inputs": ["a fine lamp"]}))
    dst = tmp_path / "out.json"
    env = dict(os.environ)
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    done = subprocess.run(
        [
            mlflow_bin,
            "models",
            "predict",
            "-m",
            "models:/reg@champion",
            "-i",
            str(inp),
            "-t",
            "json",
            "-o",
            str(dst),
            "--env-manager",
            "local",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    predictions = json.loads(dst.read_text())["predictions"]
    assert predictions[0]["label"] in TINY_LABELS
