"""The training techniques from YAML and the CLI, through Ray Train's workers and the
compress stage: AdaLoRA, dropout override, label smoothing, FGM, distillation, pruning.

One run turns them all on at once (they compose through the loop's technique hooks), so the
suite pays for one training and one compression. Each technique's own behaviour is proved
in the unit tests (test_peft_methods, test_adversarial, test_regularization, test_distill,
test_prune); this test proves that the YAML reaches the workers and MLflow.
"""

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from lepton_ray.cli import app
from lepton_ray.data.sample import write_reviews_csv
from tests.conftest import smoke_config, write_yaml

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_every_technique_from_one_yaml_trains_compresses_and_is_logged(
    tmp_path, ray_session, tiny_artifact
):
    data = write_reviews_csv(tmp_path / "reviews.csv", n=200, seed=11)
    raw = smoke_config(
        tmp_path,
        data,
        name="techniques",
        model={"dropout": {"hidden": 0.2, "attention": 0.05}},
        peft={
            "method": "adalora",
            "adalora": {
                "init_r": 4,
                "target_r": 2,
                "tinit": 0,
                "tfinal": 1,
                "deltaT": 1,
                "orth_reg_weight": 0.5,
            },
        },
        train={
            "epochs": 1,
            "max_steps_per_epoch": 6,
            "eval_every_steps": 2,
            "label_smoothing": 0.1,
            "adversarial": {"method": "fgm", "epsilon": 0.5},
            "distill": {"teacher": str(tiny_artifact), "temperature": 2.0, "alpha": 0.5},
        },
        compress={
            "method": "fp32",
            "max_drop": 100.0,  # a random tiny model: the plumbing, not its accuracy
            "prune": {"sparsity": 0.5, "heads": 1, "recovery_steps": 2},
        },
    )
    path = str(write_yaml(tmp_path / "techniques.yaml", raw))
    assert runner.invoke(app, ["validate", path]).exit_code == 0
    assert runner.invoke(app, ["preprocess", path]).exit_code == 0
    result = runner.invoke(app, ["train", path])
    assert result.exit_code == 0, result.output
    assert "distill: teacher" in result.output

    uri = raw["tracking"]["tracking_uri"]
    c = MlflowClient(uri, registry_uri=uri)
    champion = c.get_model_version_by_alias("techniques", "champion")
    run = c.get_run(champion.run_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["peft.method"] == "adalora" and params["train.label_smoothing"] == "0.1"
    assert params["model.dropout.hidden"] == "0.2"
    assert params["train.adversarial.method"] == "fgm"
    assert 0 < metrics["params_trainable_share"] < 1
    for name in ("train_adv_loss", "train_distill_kl", "train_task_loss", "adalora_orth_reg"):
        assert name in metrics, (name, sorted(metrics))
    # The rank budget, as each evaluation saw it: 2 layers x (query, value) start at
    # init_r 4 (16 in all) and shrink to target_r 2 (8) over the 4 steps (120 training rows,
    # 2 workers, batch 16) less tfinal.
    ranks = [m.value for m in c.get_metric_history(run.info.run_id, "adalora_total_rank")]
    assert len(ranks) == 2 and ranks[-1] == 8, ranks

    result = runner.invoke(app, ["compress", path])
    assert result.exit_code == 0, result.output
    compressed = c.get_model_version_by_alias("techniques", "champion")
    assert int(compressed.version) > int(champion.version)
    assert compressed.tags["lepton.quantization"] == "fp32"
    figures = c.get_run(compressed.run_id).data.metrics
    assert figures["prune_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert figures["prune_heads_removed"] == 2  # one of the two heads of each of 2 layers
    assert figures["params_pruned"] < figures["params_fp32"]
