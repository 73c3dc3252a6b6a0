"""The stages one command at a time: preprocess, train, compress, serve --model-uri."""

import time

import pytest
import requests
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from lepton_ray.cli import app
from lepton_ray.data.sample import write_reviews_csv
from tests.conftest import smoke_config, write_yaml

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_session, serve_port):
    tmp = tmp_path_factory.mktemp("stages")
    data = write_reviews_csv(tmp / "reviews.csv", n=240, seed=5)
    port = serve_port
    raw = smoke_config(
        tmp,
        data,
        name="stages",
        serve={"enabled": True, "port": port, "app_name": "stages"},
        train={"epochs": 1},
        compress={"max_drop": 100.0},  # a random tiny model: gate plumbing, not its accuracy
    )
    path = write_yaml(tmp / "stages.yaml", raw)
    return {
        "path": path,
        "raw": raw,
        "url": f"http://127.0.0.1:{port}",
        "client": MlflowClient(
            raw["tracking"]["tracking_uri"], registry_uri=raw["tracking"]["tracking_uri"]
        ),
    }


def test_train_before_preprocess_is_a_clear_error(setup):
    result = runner.invoke(app, ["train", str(setup["path"])])
    assert result.exit_code == 2
    assert "run `lepton-ray preprocess`" in result.output


def test_preprocess_train_compress_serve(setup):
    path, c = str(setup["path"]), setup["client"]
    assert runner.invoke(app, ["preprocess", path]).exit_code == 0
    result = runner.invoke(app, ["train", path])
    assert result.exit_code == 0, result.output
    champion = c.get_model_version_by_alias("stages", "champion")
    run = c.get_run(champion.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["lepton.stage"] == "train"
    assert "val_macro_f1" in run.data.metrics
    assert {a.path for a in c.list_artifacts(run.info.run_id, "plots")} >= {
        "plots/learning_curves.png",
        "plots/confusion_matrix_val.png",
    }

    result = runner.invoke(app, ["compress", path])
    assert result.exit_code == 0, result.output
    # The compression is registered naming its source, and (gated by compress.max_drop)
    # becomes the champion: @champion is what is served, compressed or not.
    compressed = c.get_model_version_by_alias("stages", "champion")
    assert int(compressed.version) > int(champion.version)
    assert compressed.tags["lepton.source_version"] == str(champion.version)
    assert compressed.tags["lepton.quantization"] != "none"

    # Serve a chosen version, not the default alias.
    uri = f"models:/stages/{champion.version}"
    result = runner.invoke(app, ["serve", path, "--model-uri", uri])
    assert result.exit_code == 0, result.output
    meta = requests.get(f"{setup['url']}/v1/model", timeout=10).json()
    assert meta["model"] == uri and meta["weights"] == "adapter"

    # The replica holds a CPU that 2 training workers need on this 2-CPU cluster: training
    # must say so at once instead of waiting forever.
    result = runner.invoke(app, ["train", path])
    assert result.exit_code == 2
    assert "only 1 of 2 are free" in result.output and "stages" in result.output

    result = runner.invoke(app, ["serve", path, "--stop"])
    assert result.exit_code == 0 and "stopped application 'stages'" in result.output
    # The HTTP proxy stays up; the application's routes are gone.
    assert requests.get(f"{setup['url']}/healthz", timeout=5).status_code == 404


def test_a_new_uncompressed_champion_is_what_serve_deploys(setup):
    """Never the compression of an older champion, and pinned by number in every replica."""
    path, c = str(setup["path"]), setup["client"]
    old_champion = c.get_model_version_by_alias("stages", "champion")
    result = runner.invoke(app, ["train", path, "--set", "registry.promotion=always"])
    assert result.exit_code == 0, result.output
    champion = c.get_model_version_by_alias("stages", "champion")
    assert int(champion.version) > int(old_champion.version)
    assert champion.tags["lepton.quantization"] == "none"

    result = runner.invoke(app, ["serve", path])
    assert result.exit_code == 0, result.output
    pinned = f"models:/stages/{champion.version}"
    meta = requests.get(f"{setup['url']}/v1/model", timeout=10).json()
    assert meta["model"] == pinned and meta["version"] == str(champion.version)
    answer = requests.post(f"{setup['url']}/v1/predict", json={"texts": ["ok"]}, timeout=30)
    assert answer.json()["model"] == pinned

    # Move the alias, then kill the replica: Serve restarts it, and it loads the pinned
    # version, not whatever @champion names now.
    import ray

    c.set_registered_model_alias("stages", "champion", old_champion.version)
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::stages#")
    ]
    assert len(replicas) == 1, replicas
    old_replica = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    ray.kill(old_replica, no_restart=True)
    deadline = time.time() + 120
    restarted = None
    while time.time() < deadline:
        time.sleep(2)
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::stages#")
        ]
        if names and names != [replicas[0]["name"]]:
            try:
                restarted = requests.get(f"{setup['url']}/v1/model", timeout=5)
            except requests.RequestException:
                continue
            if restarted.status_code == 200:
                break
    assert restarted is not None and restarted.status_code == 200
    assert restarted.json()["model"] == pinned
    c.set_registered_model_alias("stages", "champion", champion.version)
    assert runner.invoke(app, ["serve", path, "--stop"]).exit_code == 0


def test_training_crash_marks_run_failed_and_registers_nothing(setup, tmp_path):
    """A worker that crashes (here: resuming from a checkpoint of another model, which
    only the workers can find out) fails the run FAILED, with the worker's error."""
    import torch
    from safetensors.torch import save_file

    path, c = str(setup["path"]), setup["client"]
    alien = tmp_path / "alien-checkpoint"
    alien.mkdir()
    save_file({"some.other.model.weight": torch.zeros(2)}, str(alien / "trainable.safetensors"))
    torch.save({"optimizer": {}, "scheduler": {}, "epoch": 0}, alien / "trainer_state.pt")
    before = {v.version for v in c.search_model_versions("name='stages'")}
    result = runner.invoke(
        app,
        ["train", path, "--set", f"train.resume_from={alien}", "--set", "train.max_failures=0"],
    )
    assert result.exit_code == 1, result.output
    assert "error: training failed" in result.output
    assert "does not match the model" in result.output
    exp = c.get_experiment_by_name("stages")
    latest = c.search_runs(
        [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )[0]
    assert latest.info.status == "FAILED"
    assert {v.version for v in c.search_model_versions("name='stages'")} == before
    # The failed run gives its workers' CPUs back (no controller left holding them).
    import ray

    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.time() < deadline, ray.available_resources()
        time.sleep(1)


def test_serving_an_unknown_model_is_a_clear_error(setup):
    result = runner.invoke(app, ["serve", str(setup["path"]), "--model-uri", "models:/stages/99"])
    assert result.exit_code == 2
    assert "no registered model models:/stages/99" in result.output


def test_a_second_serve_port_on_the_same_cluster_is_a_clear_error(setup):
    result = runner.invoke(app, ["serve", str(setup["path"]), "--set", "serve.port=1"])
    assert result.exit_code == 2
    assert "already listens on http://127.0.0.1:" in result.output
