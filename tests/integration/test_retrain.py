"""`lepton-ray retrain` end to end: real Ray, MLflow registry and Serve, with live traffic.

The experiment runs once (champion served), then is retrained on new data with replay while
a client sends requests without pause. Every request must succeed, answers must come from
the old or the new version only, and the endpoint must end on the new champion.
"""

from __future__ import annotations

import threading
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


class Traffic:
    """One client posting a text at a time, recording every status and answering model."""

    def __init__(self, url: str):
        self.url = url
        self.answers: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                resp = session.post(
                    f"{self.url}/v1/predict", json={"texts": ["The lamp works."]}, timeout=60
                )
                model = resp.json().get("model") if resp.status_code == 200 else resp.text
                self.answers.append((resp.status_code, model))
            except requests.RequestException as err:
                self.answers.append((0, repr(err)))
            time.sleep(0.02)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_session, serve_port):
    tmp = tmp_path_factory.mktemp("retrain")
    data = write_reviews_csv(tmp / "reviews.csv", n=240, seed=11)
    new = write_reviews_csv(tmp / "new_reviews.csv", n=200, seed=29)
    raw = smoke_config(
        tmp,
        data,
        scaling={"num_workers": 1},
        compress={"enabled": True, "method": "dynamic_int8", "max_drop": 100.0},
        # The default tolerance (0): the retrained version must score at least the
        # champion's on the new validation split (each through its own preprocessing).
        registry={"promotion": "gated"},
        serve={"enabled": True, "port": serve_port, "app_name": "retrain-swap", "num_cpus": 0.5},
    )
    path = write_yaml(tmp / "smoke.yaml", raw)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    uri = raw["tracking"]["tracking_uri"]
    yield {
        "tmp": tmp,
        "config": path,
        "new": new,
        "url": f"http://127.0.0.1:{serve_port}",
        "client": MlflowClient(uri, registry_uri=uri),
    }
    runner.invoke(app, ["serve", str(path), "--stop"])


def test_retrain_swaps_the_endpoint_with_no_failed_request(served):
    c = served["client"]
    before = c.get_model_version_by_alias("smoke", "champion")
    old_uri = f"models:/smoke/{before.version}"
    assert requests.get(f"{served['url']}/v1/model", timeout=10).json()["model"] == old_uri

    with Traffic(served["url"]) as traffic:
        time.sleep(1.0)
        result = runner.invoke(
            app,
            ["retrain", str(served["config"]), "--data", str(served["new"]), "--replay", "0.5"],
        )
        time.sleep(2.0)
    assert result.exit_code == 0, result.output

    after = c.get_model_version_by_alias("smoke", "champion")
    new_uri = f"models:/smoke/{after.version}"
    assert int(after.version) > int(before.version)
    statuses = [s for s, _ in traffic.answers]
    assert len(statuses) > 20, "the traffic thread sent too few requests to judge the swap"
    assert set(statuses) == {200}, [a for a in traffic.answers if a[0] != 200][:5]
    models = [m for _, m in traffic.answers]
    assert set(models) <= {old_uri, new_uri}, set(models)
    assert models[0] == old_uri and models[-1] == new_uri
    # Once the new model answered, the old one never did again: one switch, no flapping.
    first_new = models.index(new_uri)
    assert set(models[first_new:]) == {new_uri}
    meta = requests.get(f"{served['url']}/v1/model", timeout=10).json()
    assert meta["model"] == new_uri


def test_retrained_version_records_its_lineage(served):
    c = served["client"]
    champion = c.get_model_version_by_alias("smoke", "champion")
    tags = champion.tags
    # The champion is the int8 compression of the retrained float version.
    assert tags["lepton.quantization"] == "dynamic_int8"
    trained = c.get_model_version("smoke", tags["lepton.source_version"])
    assert trained.tags["lepton.retrained_from"] == "models:/smoke/1"
    assert trained.tags["lepton.retrain_data"] == str(served["new"])
    assert int(trained.tags["lepton.replay_rows"]) > 0
    assert "retrained_from" in " ".join(trained.tags) and trained.tags["lepton.data_fingerprint"]
    exp = c.get_experiment_by_name("smoke")
    runs = c.search_runs([exp.experiment_id], "tags.`lepton.stage` = 'retrain'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["lepton.promoted"] == "True"
    # The contamination check against the champion's training texts ran and was logged
    # (the same hash split keeps those texts in train here: nothing to remove).
    assert runs[0].data.metrics["data_rows_seen_in_training"] == 0
    trained_on = trained.tags["lepton.trained_on"].splitlines()
    assert trained_on[0].endswith("smoke/data/train") and trained_on[-1].endswith("data/train")
    assert len(trained_on) == 2


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--from", "smoke/99"], "has no version 99"),
        (["--from", "other@champion"], "other"),
        (["--replay", "1.5"], "--replay 1.5"),
        (["--data", "/nonexistent/new.csv"], "no such file"),
    ],
)
def test_retrain_bad_input_is_one_line_and_leaves_the_registry(served, args, needle):
    c = served["client"]
    versions = len(c.search_model_versions("name='smoke'"))
    champion = c.get_model_version_by_alias("smoke", "champion").version
    argv = ["retrain", str(served["config"]), "--data", str(served["new"]), *args]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert len(c.search_model_versions("name='smoke'")) == versions
    assert c.get_model_version_by_alias("smoke", "champion").version == champion
