"""A model version registered by lepton-ray before the package was restructured (commit
843e142, before 4f1328e) still works: the new code downloads, loads, predicts with and scores
it, reads its metadata and tags, and MLflow alone (with the old package that travels in the
version's ``code/`` folder) answers exactly as the new code does.

The version is ``tests/fixtures/registered_version_843e142.tar.gz``: the MLflow pyfunc package
the old ``registry.package_pyfunc`` wrote for a tiny random BERT, and beside it the tags the
old ``registry.register`` set (``tests/fixtures/make_old_version.py`` made both, with the
old code). It is registered here into a fresh store with MLflow's own client, laid out as
the old ``register`` did: the package logged under the run at ``registered_model``, the
version's source that folder, marked ``@challenger``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lepton_ray.registry import versions
from tests.conftest import TINY_LABELS, mlflow_store, smoke_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TARBALL = FIXTURES / "registered_version_843e142.tar.gz"
OLD_TAGS = FIXTURES / "registered_version_843e142.tags.json"
NAME = "old843"
URI = f"models:/{NAME}/1"
TEXTS = ["a text", "another", "a long review " * 20]  # the last one is cut at max_length 16


@pytest.fixture(scope="module")
def old_version(tmp_path_factory) -> dict:
    """The old package unpacked and registered as version 1 of NAME in a fresh store."""
    tmp = tmp_path_factory.mktemp("old-version")
    package = tmp / "package"
    with tarfile.open(TARBALL) as tar:
        tar.extractall(package, filter="data")
    store = mlflow_store(tmp)
    c = store["client"]
    run_id = c.create_run(store["experiment"]).info.run_id
    c.log_artifacts(run_id, str(package), versions.PACKAGE_PATH)
    c.create_registered_model(NAME)
    tags = {**json.loads(OLD_TAGS.read_text()), "lepton.run_id": run_id}
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/{versions.PACKAGE_PATH}"
    version = c.create_model_version(NAME, source=source, run_id=run_id, tags=tags)
    c.set_registered_model_alias(NAME, versions.CHALLENGER, version.version)
    assert str(version.version) == "1"
    return {**store, "tmp": tmp, "package": package, "run_id": run_id}


@pytest.fixture(scope="module")
def loaded(old_version) -> dict:
    """The version as the new code loads it: artifact folder, model, tokenizer, meta."""
    from lepton_ray.compress.formats import load_model_artifact
    from lepton_ray.tracking.mlflow import download_model

    folder = download_model(old_version["uri"], URI, old_version["tmp"] / "download")
    model, tokenizer, meta = load_model_artifact(folder)
    return {"folder": folder, "model": model, "tokenizer": tokenizer, "meta": meta}


@pytest.fixture(scope="module")
def new_answers(loaded) -> list[dict]:
    from lepton_ray.tasks import get_task

    meta = loaded["meta"]
    return get_task(meta.task).predict(loaded["model"], loaded["tokenizer"], meta, TEXTS)


def test_the_fixture_is_the_old_package(old_version):
    package = old_version["package"]
    assert (package / "MLmodel").is_file() and (package / "pyfunc_model.py").is_file()
    old = package / "code" / "lepton_ray"
    # The pre-restructuring layout: models.py, registry.py, predict.py, no tasks/ nor artifacts.py.
    assert (old / "models.py").is_file() and (old / "registry.py").is_file()
    assert (old / "predict.py").is_file() and (old / "tracking" / "pyfunc_model.py").is_file()
    assert not (old / "tasks").exists() and not (old / "artifacts.py").exists()


def test_the_new_code_loads_and_predicts(loaded, new_answers):
    from lepton_ray.artifacts import ModelMeta

    folder = loaded["folder"]
    assert folder.name == "model" and folder.parent.name == "artifacts"
    assert (folder.parent.parent / "MLmodel").is_file()  # found inside the pyfunc package
    meta = ModelMeta.load(folder)
    assert meta == loaded["meta"]
    assert (meta.task, meta.labels, meta.weights) == (
        "sequence_classification",
        TINY_LABELS,
        "full",
    )
    assert (meta.max_length, meta.peft_method) == (16, "none")
    assert len(new_answers) == len(TEXTS)
    for answer in new_answers:
        assert answer["label"] in TINY_LABELS
        assert set(answer["probabilities"]) == set(TINY_LABELS)
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        best = max(answer["probabilities"], key=answer["probabilities"].get)
        assert answer["label"] == best
    assert [a["truncated"] for a in new_answers] == [False, False, True]


def test_mlflow_alone_loads_it_and_answers_as_the_new_code(old_version, new_answers):
    """A fresh interpreter that imports MLflow, not lepton-ray: MLflow puts the version's own
    (old) package on the path and runs its pyfunc."""
    script = (
        "import json, sys, mlflow.pyfunc\n"
        "assert 'lepton_ray' not in sys.modules\n"
        f"m = mlflow.pyfunc.load_model({URI!r})\n"
        f"out = m.predict({TEXTS!r})\n"
        "import lepton_ray\n"
        "print(json.dumps({'lepton_ray': lepton_ray.__file__,"
        " 'rows': json.loads(out.to_json(orient='records'))}))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": old_version["uri"]}
    env.pop("PYTHONPATH", None)
    env.pop("MLFLOW_REGISTRY_URI", None)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=old_version["tmp"],  # not the checkout: its lepton_ray must not be importable
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    used = Path(result["lepton_ray"])
    assert used.parent.parent.name == "code" and (used.parent / "models.py").is_file(), used
    rows = result["rows"]
    assert len(rows) == len(new_answers)
    for row, answer in zip(rows, new_answers, strict=True):
        assert set(row) == {"label", "truncated", *(f"prob_{label}" for label in TINY_LABELS)}
        assert row["label"] == answer["label"]
        assert row["truncated"] == answer["truncated"]
        for label, p in answer["probabilities"].items():
            assert row[f"prob_{label}"] == pytest.approx(p, abs=1e-5)


def test_the_gate_scores_it(old_version, loaded, new_answers):
    """``gate.score_version`` on an experiment whose data has the version's labels.

    The experiment's data folder holds only the manifest fields the scorer reads (a real
    preprocess needs Ray and is covered by test_gate_evaluator.py); the split's frames are
    given as the scorer takes them: raw texts and the task's target column.
    """
    import pandas as pd

    from lepton_ray.config import validate_experiment
    from lepton_ray.registry import gate

    tmp = old_version["tmp"]
    raw = smoke_config(
        tmp,
        tmp / "reviews.csv",
        tracking={"tracking_uri": old_version["uri"], "registered_model_name": NAME},
    )
    cfg = validate_experiment(raw, check_files=False)
    cfg.data_dir.mkdir(parents=True)
    manifest = {"model": cfg.model.name, "max_length": cfg.data.max_length, "labels": TINY_LABELS}
    (cfg.data_dir / "manifest.json").write_text(json.dumps(manifest))

    targets = [0, 1, 1]
    frame = pd.DataFrame({gate.RAW_TEXT: TEXTS, "label_id": targets})
    scored, labels = gate.score_version(cfg, URI, [frame])
    assert labels == TINY_LABELS and scored["examples"] == len(TEXTS)
    predicted = [TINY_LABELS.index(a["label"]) for a in new_answers]
    expected = sum(p == t for p, t in zip(predicted, targets)) / len(targets)
    assert scored["accuracy"] == pytest.approx(expected)  # read through its own preprocessing


def test_the_registry_reads_its_version_and_tags(old_version):
    tags = json.loads(OLD_TAGS.read_text())
    rows = versions.list_versions(old_version["uri"], NAME)
    assert len(rows) == 1
    row = rows[0]
    assert (row["name"], row["version"], row["aliases"]) == (NAME, "1", [versions.CHALLENGER])
    assert row["run_id"] == old_version["run_id"]
    assert row["source"].endswith(f"/{versions.PACKAGE_PATH}")
    assert (row["quantization"], row["peft_method"], row["source_version"]) == (
        "none",
        "none",
        None,
    )
    assert row["metrics"] == {"val_accuracy": "0.5", "val_loss": "0.693147"}
    assert row["lineage"]["lepton.git_sha"] == "843e142"
    assert row["lineage"]["lepton.eval_split"] == tags["lepton.eval_split"]
    resolved = versions.resolve(old_version["uri"], f"{NAME}@{versions.CHALLENGER}")
    assert versions.describe(resolved, [versions.CHALLENGER]) == row
