"""`lepton-ray ui` prints the links a user needs: MLflow 3's UI otherwise opens an experiment
on its GenAI overview, and hides the model registry from its sidebar."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from lepton_ray.config import validate_experiment
from lepton_ray.runtime.cluster import free_port
from lepton_ray.tracking.mlflow import client, ensure_experiment
from tests.conftest import smoke_config, write_yaml
from tests.integration.two_nodes import _stop_session

CLI = str(Path(sys.executable).parent / "lepton-ray")


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    """Until ``text`` is in the file ``proc`` writes (the links come before MLflow starts)."""
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)


def test_ui_prints_the_runs_table_and_the_registered_model(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("review,sentiment\ngood,positive\nbad,negative\n")
    raw = smoke_config(tmp_path, data, name="ui-check")
    config = write_yaml(tmp_path / "c.yaml", raw)
    cfg = validate_experiment(raw)
    experiment_id = ensure_experiment(cfg.tracking, cfg.name)
    client(cfg.tracking.tracking_uri).create_registered_model(cfg.registered_model_name)

    # A port of its own, on 127.0.0.1 (what `lepton-ray ui` binds); stopped once it printed.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out_file = tmp_path / "ui.out"
    with open(out_file, "w") as out:
        proc = subprocess.Popen(
            [CLI, "ui", str(config), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        _wait_for_text(out_file, "model:", proc)
    finally:
        _stop_session(proc.pid)
    printed = out_file.read_text()
    runs = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    assert f"runs:  {runs}" in printed, printed
    assert f"model: {base}/#/models/ui-check?workflowType=machine_learning" in printed, printed
