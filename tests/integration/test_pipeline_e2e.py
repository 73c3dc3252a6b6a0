"""The whole pipeline through the CLI on a smoke config, against real Ray, MLflow and Serve."""

import json

import pytest
import requests
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from lepton_ray.cli import app
from lepton_ray.data.sample import write_reviews_csv
from tests.conftest import smoke_config, write_yaml

pytestmark = pytest.mark.slow
runner = CliRunner()
TEXTS = [
    "The lamp works perfectly. Recommended.",
    "The tent broke after two days. Avoid.",
    "Honestly, the chair is noisy and slow.",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, ray_session, serve_port):
    tmp = tmp_path_factory.mktemp("e2e")
    data = write_reviews_csv(tmp / "reviews.csv", n=320, seed=11)
    port = serve_port
    raw = smoke_config(
        tmp,
        data,
        tune={
            "enabled": True,
            "num_samples": 2,
            "metric": "val_accuracy",
            "mode": "max",
            "space": {
                "train.lr": {"type": "loguniform", "low": 1e-3, "high": 5e-3},
                "peft.lora.r": {"type": "choice", "values": [2, 4]},
            },
        },
        # A random tiny model's accuracy swings with any rounding: this test is about the
        # plumbing, so the accuracy gate lets every compression through.
        compress={"enabled": True, "max_drop": 100.0},
        serve={"enabled": True, "port": port, "app_name": "smoke-e2e", "example_texts": TEXTS},
    )
    path = write_yaml(tmp / "smoke.yaml", raw)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    yield {
        "tmp": tmp,
        "config": path,
        "raw": raw,
        "output": result.output,
        "url": f"http://127.0.0.1:{port}",
        "client": MlflowClient(
            raw["tracking"]["tracking_uri"], registry_uri=raw["tracking"]["tracking_uri"]
        ),
    }
    # The replica holds a CPU; later tests in this Ray session need both for training.
    assert runner.invoke(app, ["serve", str(path), "--stop"]).exit_code == 0


def _runs(client, **tags):
    exp = client.get_experiment_by_name("smoke")
    filt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([exp.experiment_id], filter_string=filt)


def test_parent_and_nested_trial_runs_have_metrics(pipeline):
    c = pipeline["client"]
    parents = _runs(c, **{"lepton.stage": "pipeline"})
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["lepton.data_fingerprint"]
    assert parent.data.tags["lepton.config_hash"]
    trials = _runs(c, **{"lepton.stage": "trial", "mlflow.parentRunId": parent.info.run_id})
    assert len(trials) == 2
    for run in trials:
        assert run.info.status in ("FINISHED", "KILLED")
        assert run.data.tags["lepton.trial_id"]
        history = c.get_metric_history(run.info.run_id, "val_accuracy")
        assert 1 <= len(history) <= 2
        assert {"train_loss", "val_loss", "val_macro_f1"} <= set(run.data.metrics)
        assert run.data.params["train.lr"]
        artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert {"config", "model"} <= artifacts
        # Every trial has its pictures, the early-stopped ones and the champion above all.
        assert {a.path for a in c.list_artifacts(run.info.run_id, "plots")} >= {
            "plots/learning_curves.png",
            "plots/confusion_matrix_val.png",
        }, run.info.run_name
    plots = {a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/sweep.png" in plots


def test_experiment_opens_as_model_training_in_the_mlflow_ui(pipeline):
    exp = pipeline["client"].get_experiment_by_name("smoke")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_registered_versions_and_compression_metrics(pipeline):
    c = pipeline["client"]
    champion = c.get_model_version_by_alias("smoke", "champion")
    source = c.get_model_version("smoke", champion.tags["lepton.source_version"])
    assert int(champion.version) > int(source.version)
    assert champion.tags["lepton.quantization"] != "none"
    assert source.tags["lepton.quantization"] == "none"
    assert "serving" not in c.get_registered_model("smoke").aliases
    # Lineage on the served version: data, config, code, the trial that made it, metrics
    # before and after compression.
    tags = champion.tags
    for key in (
        "lepton.data_fingerprint",
        "lepton.config_hash",
        "lepton.git_sha",
        "lepton.trial_id",
        "lepton.peft_method",
        "lepton.metric.val_accuracy",
        "lepton.metric.val_accuracy_uncompressed",
    ):
        assert tags.get(key), key
    assert tags["lepton.trial_id"] == source.tags["lepton.trial_id"]
    assert tags["lepton.peft_method"] == "lora"
    compress_run = c.get_run(champion.run_id)
    m = compress_run.data.metrics
    assert {
        "val_accuracy_fp32",
        "val_accuracy_compressed",
        "size_mb_fp32",
        "size_mb_compressed",
    } <= set(m)
    assert m["size_mb_compressed"] < m["size_mb_fp32"]
    assert float(tags["lepton.metric.val_accuracy"]) == pytest.approx(
        m["val_accuracy_compressed"], abs=1e-5
    )
    parent = _runs(c, **{"lepton.stage": "pipeline"})[0]
    assert parent.data.tags["lepton.candidate_version"] == str(champion.version)
    assert parent.data.tags["lepton.promoted"] == "True"


def test_serve_endpoint_answers_every_text(pipeline):
    resp = requests.post(f"{pipeline['url']}/v1/predict", json={"texts": TEXTS}, timeout=60)
    assert resp.status_code == 200
    body = resp.json()
    assert len(body["predictions"]) == len(TEXTS)
    for pred in body["predictions"]:
        assert pred["label"] in {"negative", "positive"}
        assert set(pred["probabilities"]) == {"negative", "positive"}
        assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert pred["probabilities"][pred["label"]] == max(pred["probabilities"].values())
    # The run deployed the champion it promoted, pinned by number.
    champion = pipeline["client"].get_model_version_by_alias("smoke", "champion")
    assert body["model"] == f"models:/smoke/{champion.version}"
    assert body["model_version"] == str(champion.version)
    meta = requests.get(f"{pipeline['url']}/v1/model", timeout=10).json()
    assert meta["version"] == str(champion.version) and meta["weights"] != "adapter"
    assert meta["quantization"] == champion.tags["lepton.quantization"]
    assert meta["cleaning"]["unicode_form"] == "NFKC"


def _probabilities(url: str, texts: list[str]) -> list[dict[str, float]]:
    resp = requests.post(f"{url}/v1/predict", json={"texts": texts}, timeout=60)
    assert resp.status_code == 200, resp.text
    return [p["probabilities"] for p in resp.json()["predictions"]]


def test_serving_cleans_text_exactly_as_training_did(pipeline):
    """The served answer for raw texts is the one for those texts as the data stage cleaned
    them (its clean_batch, with the experiment's data.clean settings)."""
    import inspect

    import pandas as pd

    from lepton_ray.config import load_experiment
    from lepton_ray.data.clean import KEEP, clean_batch

    raw = ["Ｔｈｅ lamp\u200b works\u00a0 perfectly.\n", "The\tlamp ｗｏｒｋｓ perfectly."]
    cfg = load_experiment(pipeline["config"])
    settings = cfg.data.clean.model_dump(include=set(inspect.signature(clean_batch).parameters))
    stage = clean_batch(pd.DataFrame({"text": raw, "label": ["positive"] * len(raw)}), **settings)
    assert (stage["drop_reason"] == KEEP).all()
    trained = stage["text"].tolist()
    assert all(a != b for a, b in zip(raw, trained, strict=True)), trained  # each one cleaned
    assert _probabilities(pipeline["url"], raw) == _probabilities(pipeline["url"], trained)
    served = requests.get(f"{pipeline['url']}/v1/model", timeout=10).json()["cleaning"]
    assert served == {k: settings[k] for k in served}, (served, settings)


def test_bad_texts_never_hurt_their_batch_mates(pipeline):
    """Malformed requests sent concurrently with valid ones: 4xx for them, 200 for the rest."""
    from concurrent.futures import ThreadPoolExecutor

    url = f"{pipeline['url']}/v1/predict"
    bad = [
        ('{"texts": ["\\ud800"]}', 422),  # valid JSON, a lone surrogate
        ('{"texts": ["ok \\udfff end"]}', 422),
        (b'{"texts": ["\xff\xfe bad utf-8"]}', 400),
        ('{"texts": ["' + "x" * 25_000 + '"]}', 413),
        ('{"texts": [null]}', 422),
        ("[1, 2", 422),
    ]
    good = '{"texts": ["' + "a fine lamp " * 400 + '"]}'  # long but valid: truncated

    def send(body):
        resp = requests.post(
            url, data=body, headers={"Content-Type": "application/json"}, timeout=60
        )
        return resp.status_code, resp.json()

    jobs = [(body, want) for _ in range(6) for body, want in bad] + [(good, 200)] * 24
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda job: (job[1], *send(job[0])), jobs))
    for want, status, body in answers:
        assert status == want, body
        if status == 200:
            assert body["predictions"][0]["truncated"] is True
        else:
            assert isinstance(body["error"], str) and body["error"], body


@pytest.mark.parametrize(
    "payload, status, needle",
    [
        ({"texts": []}, 422, "at least one text"),
        ({"texts": ["ok", "   "]}, 422, "texts.1: empty text"),
        ({"text": ["wrong field"]}, 422, "texts"),
        ({"texts": [3]}, 422, "texts.0"),
        ({"texts": ["x"] * 300}, 413, "at most 256"),
        ({"texts": ["ok", "y" * 20_001]}, 413, "texts.1: 20001 characters"),
    ],
    ids=["empty-list", "blank-text", "wrong-field", "not-a-string", "too-many", "too-long"],
)
def test_serve_rejects_bad_requests_with_json(pipeline, payload, status, needle):
    resp = requests.post(f"{pipeline['url']}/v1/predict", json=payload, timeout=30)
    assert resp.status_code == status
    assert needle in resp.json()["error"]


def test_serve_rejects_non_json(pipeline):
    resp = requests.post(
        f"{pipeline['url']}/v1/predict",
        data="not json",
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 422
    assert "error" in resp.json()


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b'{"texts": ["\xff"]}', 400, "not valid UTF-8"),
        ('{"texts": ["\\ud800"]}', 422, "texts.0: not encodable as UTF-8"),
    ],
    ids=["invalid-utf8", "lone-surrogate"],
)
def test_undecodable_text_is_a_json_4xx(pipeline, body, status, needle):
    resp = requests.post(
        f"{pipeline['url']}/v1/predict",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == status
    assert needle in resp.json()["error"]


def test_unknown_route_is_json_too(pipeline):
    resp = requests.get(f"{pipeline['url']}/v1/nope", timeout=10)
    assert resp.status_code == 404 and "error" in resp.json()


def test_predict_command_queries_the_endpoint(pipeline):
    result = runner.invoke(app, ["predict", str(pipeline["config"]), "--json", *TEXTS[:2]])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [line["text"] for line in lines] == TEXTS[:2]
    assert all(line["label"] in {"negative", "positive"} for line in lines)
    # Without --json: a table, one row per text, in order.
    result = runner.invoke(app, ["predict", str(pipeline["config"]), *TEXTS[:2]])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "positive" in line or "negative" in line]
    assert len(rows) >= 2 and TEXTS[0][:20] in result.output


def test_pipeline_output_tells_user_how_to_query(pipeline):
    out = pipeline["output"]
    assert "curl -s -X POST" in out and "/v1/predict" in out
    assert "lepton-ray ui" in out
