"""The notebooks in notebooks/, executed headlessly with nbclient, on smoke settings.

Each notebook runs in a fresh ipykernel of this interpreter (the project's virtualenv under
``make test``), started from a kernelspec written to a temporary folder, so no kernelspec the
user installed is used. A cell injected after the ``parameters`` cell points the notebook at
the smoke model and at this test's own folders: outputs, MLflow store and artifacts, Ray
storage, the session's Ray instance and the session's Serve port (the kernel gets the test
session's Ray environment too). Any cell error fails the test. Both notebooks share one
workspace, so the second reuses the first's preprocessed data and its registry already has a
champion for the gate to compare against. The executed notebooks are written to the
workspace for inspection.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the dev extra (nbformat) is not installed")
nbclient = pytest.importorskip("nbclient", reason="the dev extra (nbclient) is not installed")
pytest.importorskip("ipykernel", reason="the dev extra (ipykernel) is not installed")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402 - after the skips
from jupyter_client.manager import KernelManager  # noqa: E402

from tests.conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.slow

NOTEBOOKS = ROOT / "notebooks"
KERNEL = "lepton-ray-test"
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_session, serve_port):
    tmp = tmp_path_factory.mktemp("notebooks")
    kernels = tmp / "kernels"
    (kernels / KERNEL).mkdir(parents=True)
    (kernels / KERNEL / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "lepton-ray (test)",
                "language": "python",
            }
        )
    )
    gcs = ray_session.get_runtime_context().gcs_address
    overrides = [
        f"output_dir={tmp / 'outputs'}",
        f"tracking.tracking_uri=sqlite:///{tmp}/mlruns/mlflow.db",
        f"tracking.artifact_location={tmp / 'mlruns' / 'artifacts'}",
        f"cluster.storage_path={tmp / 'ray_results'}",
        f"cluster.address={gcs}",
        "scaling.num_workers=1",
        "tune.num_samples=1",  # one trial is enough to check the notebook's plumbing
        f"serve.port={serve_port}",
        "serve.num_cpus=0.5",
        "serve.app_name=notebooks",
        "serve.route_prefix=/notebooks",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        {
            # The session's Ray, never a cluster of the user's (see tests/conftest.py).
            "RAY_ADDRESS": gcs,
            "RAY_TMPDIR": os.environ["RAY_TMPDIR"],
            "RAY_AUTH_MODE": "disabled",
            "RAY_API_SERVER_ADDRESS": os.environ["RAY_API_SERVER_ADDRESS"],
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # IPython's profile and history stay out of the user's home.
            "IPYTHONDIR": str(tmp / "ipython"),
            "JUPYTER_PLATFORM_DIRS": "1",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }
    )
    return {"tmp": tmp, "kernels": kernels, "overrides": overrides, "env": env, "gcs": gcs}


def parameters_index(nb) -> int:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return i
    raise AssertionError("no code cell tagged 'parameters'")


def execute(name: str, ws: dict):
    """Run ``notebooks/NAME`` with the smoke settings injected; returns the executed notebook."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    smoke = ROOT / "experiments" / "quickstart_smoke.yaml"
    injected = nbformat.v4.new_code_cell(
        f"CONFIG = {str(smoke)!r}\nOVERRIDES = [*OVERRIDES, *{ws['overrides']!r}]",
        metadata={"tags": ["injected-parameters"]},
    )
    nb.cells.insert(parameters_index(nb) + 1, injected)
    km = KernelManager(
        kernel_name=KERNEL,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(ws["kernels"])]),
        connection_file=str(ws["tmp"] / f"kernel-{Path(name).stem}.json"),
    )
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=180,  # a kernel on a busy 2-core machine
        # Started in notebooks/, as Jupyter would: the notebook moves to the repository root.
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    try:
        client.execute(env=ws["env"])
    finally:
        nbformat.write(nb, ws["tmp"] / f"executed-{name}")
    return nb


def outputs(nb, kind: str) -> list:
    return [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})
    ]


def test_quickstart_notebook(workspace):
    nb = execute("01_quickstart.ipynb", workspace)
    # Inline figures: label distribution, learning curves, confusion matrix, ROC curve,
    # and the three plots the training run logged to MLflow.
    assert len(outputs(nb, "image/png")) >= 7


def test_sweep_register_serve_notebook(workspace):
    from mlflow.tracking import MlflowClient

    from lepton_ray.runtime.cluster import serve_applications

    nb = execute("02_sweep_register_serve.ipynb", workspace)
    assert outputs(nb, "text/html"), "the trials and versions tables are displayed"
    uri = f"sqlite:///{workspace['tmp']}/mlruns/mlflow.db"
    c = MlflowClient(uri, registry_uri=uri)
    exp = c.get_experiment_by_name("quickstart-smoke")
    trials = c.search_runs([exp.experiment_id], filter_string="tags.`lepton.stage` = 'trial'")
    assert len(trials) == 1
    # The sweep's best (after notebook 01's version when that ran first); one is the champion.
    versions = {str(v.version) for v in c.search_model_versions("name='quickstart-smoke'")}
    assert versions
    assert str(c.get_model_version_by_alias("quickstart-smoke", "champion").version) in versions
    assert "notebooks" not in serve_applications(), "the last cell stops the endpoint"
