"""Regularisation switches: ``model.dropout`` reaches the built model's dropout under the model
type's own names, ``train.label_smoothing`` changes each task's loss by the expected amount,
the optimisation settings are logged as params, and bad values fail at validate in one line."""

from __future__ import annotations

import math

import optuna
import pytest
import torch
from typer.testing import CliRunner

from lepton_ray.artifacts import build_model
from lepton_ray.cli import app
from lepton_ray.config import ModelConfig, validate_experiment
from lepton_ray.config.experiment import apply_overrides
from lepton_ray.config.regularization import DropoutSection
from lepton_ray.errors import ConfigError
from lepton_ray.tasks import get_task
from lepton_ray.tasks.causal_lm_eval import token_loss
from lepton_ray.tune.space import DefineByRun, dimensions
from tests.conftest import TINY_BERT, TINY_LABELS, TINY_LLAMA, smoke_config, write_yaml

runner = CliRunner()
SEQ = "sequence_classification"


def _dropouts(model) -> dict[str, float]:
    return {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}


# ------------------------------------------------------------------------------ dropout
def test_bert_dropout_override_sets_hidden_and_attention_dropout_modules():
    cfg = ModelConfig(
        name="minilm",
        random_init=True,
        config_overrides=TINY_BERT,
        dropout={"hidden": 0.3, "attention": 0.2},
    )
    model = build_model(cfg, "sequence_classification", TINY_LABELS)
    found = _dropouts(model)
    attention = {n: p for n, p in found.items() if n.endswith("attention.self.dropout")}
    hidden = {n: p for n, p in found.items() if n not in attention}
    assert len(attention) == TINY_BERT["num_hidden_layers"]
    assert set(attention.values()) == {0.2}
    # embeddings, every attention and feed-forward output, and the classifier head
    assert "bert.embeddings.dropout" in hidden and "dropout" in hidden
    assert set(hidden.values()) == {0.3}

    plain = build_model(cfg.model_copy(update={"dropout": DropoutSection()}), SEQ, TINY_LABELS)
    assert set(_dropouts(plain).values()) == {0.1}  # MiniLM's own


def test_dropout_override_applies_to_an_init_from_model_with_its_weights(tiny_artifact):
    cfg = ModelConfig(name="minilm", init_from=str(tiny_artifact), dropout={"hidden": 0.05})
    model = build_model(cfg, "sequence_classification", TINY_LABELS)
    plain = build_model(ModelConfig(name="minilm", init_from=str(tiny_artifact)), SEQ, TINY_LABELS)
    assert model.config.hidden_dropout_prob == 0.05
    attention = {n: p for n, p in _dropouts(model).items() if n.endswith("self.dropout")}
    hidden = {n: p for n, p in _dropouts(model).items() if n not in attention}
    assert set(hidden.values()) == {0.05}
    assert set(attention.values()) == {plain.config.attention_probs_dropout_prob}
    mine, theirs = model.state_dict(), plain.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_llama_attention_dropout_is_set_and_hidden_is_refused(smollm2_path):
    cfg = ModelConfig(
        name="smollm2", random_init=True, config_overrides=TINY_LLAMA, dropout={"attention": 0.25}
    )
    model = build_model(cfg, "causal_lm", [])
    rates = {layer.self_attn.attention_dropout for layer in model.model.layers}
    assert rates == {0.25}

    with pytest.raises(ValueError, match=r"model\.dropout\.hidden: llama models have no hidden"):
        ModelConfig(name="smollm2", config_overrides=TINY_LLAMA, dropout={"hidden": 0.1})


def test_dropout_and_a_config_override_of_the_same_attribute_are_refused():
    with pytest.raises(ValueError, match="model.config_overrides.hidden_dropout_prob"):
        ModelConfig(
            name="minilm",
            config_overrides={"hidden_dropout_prob": 0.2},
            dropout={"hidden": 0.1},
        )


# ------------------------------------------------------------------------------ label smoothing
class _Out:
    def __init__(self, logits, loss=None):
        self.logits, self.loss = logits, loss


def _smoothed_ce(logits: list[float], target: int, eps: float) -> float:
    """(1 - eps) * NLL(target) + eps * mean over classes of NLL(class), by hand."""
    top = max(logits)
    log_z = top + math.log(sum(math.exp(x - top) for x in logits))
    nll = [log_z - x for x in logits]
    return (1 - eps) * nll[target] + eps * sum(nll) / len(logits)


def test_classification_label_smoothing_changes_the_loss_by_the_expected_amount():
    task = get_task("sequence_classification")
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    own = torch.nn.functional.cross_entropy(logits, labels)
    out = _Out(logits, loss=own)
    assert task.loss(out, {"labels": labels}) is own  # 0: the model's own loss, unchanged
    assert task.loss(out, {"labels": labels}, 0.0) is own
    rows = logits.tolist()
    for eps in (0.1, 0.3):
        expected = sum(_smoothed_ce(rows[i], int(labels[i]), eps) for i in range(2)) / 2
        got = task.loss(out, {"labels": labels}, eps)
        assert got.item() == pytest.approx(expected, rel=1e-6)
        assert got.item() != pytest.approx(own.item(), rel=1e-3)


def test_causal_lm_label_smoothing_counts_only_trained_tokens():
    task = get_task("causal_lm")
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 1, -100], [-100, 4, 4, -100, -100]])
    batch = {"labels": labels}
    # Position t's logits predict label t + 1: the trained pairs, by hand.
    pairs = [(0, 1, 3), (0, 2, 1), (1, 0, 4), (1, 1, 4)]
    plain = sum(_smoothed_ce(logits[b, t].tolist(), y, 0.0) for b, t, y in pairs) / len(pairs)
    smooth = sum(_smoothed_ce(logits[b, t].tolist(), y, 0.2) for b, t, y in pairs) / len(pairs)

    old = token_loss(logits, labels)
    assert task.loss(_Out(logits), batch).item() == pytest.approx(plain, rel=1e-6)
    assert torch.equal(task.loss(_Out(logits), batch, 0.0), old)
    assert task.loss(_Out(logits), batch, 0.2).item() == pytest.approx(smooth, rel=1e-6)
    assert smooth != pytest.approx(plain, rel=1e-3)


def test_a_task_without_smoothing_refuses_it_rather_than_ignoring_it():
    from lepton_ray.tasks.base import Task

    with pytest.raises(NotImplementedError, match="label smoothing"):
        Task.loss(get_task("sequence_classification"), _Out(None, loss=1.0), {}, 0.1)


def test_the_loop_passes_label_smoothing_to_the_task_loss(tmp_path):
    from lepton_ray.train.loop import LoopSettings, _forward_backward
    from lepton_ray.train.precision import Precision
    from lepton_ray.train.techniques import Techniques

    raw = _raw(tmp_path, train={"label_smoothing": 0.3})
    cfg = validate_experiment(raw, check_files=False)
    settings = LoopSettings.from_config(cfg)
    assert settings.label_smoothing == 0.3
    task = get_task(cfg.task)
    model = build_model(cfg.model, cfg.task, TINY_LABELS)
    model.eval()  # no dropout: the two passes see the same logits
    batch = {"input_ids": torch.randint(5, 999, (3, 8)), "labels": torch.tensor([0, 1, 1])}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    fp32 = Precision("fp32", "cpu", "test")
    losses = {}
    for eps in (0.0, 0.3):
        run = _forward_backward(model, task, batch, 1.0, fp32, None, Techniques(), eps)
        losses[eps] = run(True).item()
    logits = model(**batch).logits.tolist()
    expected = sum(_smoothed_ce(logits[i], int(batch["labels"][i]), 0.3) for i in range(3)) / 3
    assert losses[0.3] == pytest.approx(expected, rel=1e-5)
    assert losses[0.0] != pytest.approx(losses[0.3], rel=1e-3)


# ------------------------------------------------------------------------------ config
def _raw(tmp_path, **sections):
    (tmp_path / "reviews.csv").write_text("review,sentiment\ngood,1\nbad,0\n")
    return smoke_config(tmp_path, tmp_path / "reviews.csv", **sections)


BAD = [
    ({"train": {"adversarial": {"method": "fgm", "epsilon": 0}}}, "train.adversarial.epsilon"),
    ({"train": {"adversarial": {"method": "fgm", "epsilon": -1.0}}}, "train.adversarial.epsilon"),
    (
        {"train": {"adversarial": {"method": "fgm", "pgd_steps": 3}}},
        "train.adversarial.pgd_steps only apply to train.adversarial.method pgd, not fgm",
    ),
    (
        {"train": {"adversarial": {"method": "pgd", "epsilon": 0.1, "pgd_alpha": 0.5}}},
        "train.adversarial.pgd_alpha 0.5 is larger than train.adversarial.epsilon 0.1",
    ),
    (
        {"train": {"adversarial": {"method": "pgd"}, "strategy": "fsdp"}},
        "train.adversarial.method pgd does not run under train.strategy fsdp",
    ),
    ({"train": {"label_smoothing": 1.0}}, "train.label_smoothing"),
    ({"model": {"dropout": {"attention": 1.0}}}, "model.dropout.attention"),
]


@pytest.mark.parametrize(("sections", "message"), BAD)
def test_validate_refuses_impossible_regularisation_in_one_line(tmp_path, sections, message):
    config = write_yaml(tmp_path / "bad.yaml", _raw(tmp_path, **sections))
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code != 0, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output


def test_label_smoothing_and_epsilon_can_be_swept(tmp_path):
    space = {
        "train.label_smoothing": {"type": "uniform", "low": 0.0, "high": 0.2},
        "train.adversarial.epsilon": {"type": "loguniform", "low": 0.1, "high": 2.0},
    }
    raw = _raw(
        tmp_path,
        train={"adversarial": {"method": "fgm"}},
        tune={"enabled": True, "num_samples": 4, "space": space},
    )
    cfg = validate_experiment(raw, check_files=False)
    dims = dimensions(cfg)
    assert {d.name for d in dims} == set(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = DefineByRun(dims, cfg.model_dump(mode="json"))(study.ask())
    trial = apply_overrides(cfg, values)
    assert 0.0 <= trial.train.label_smoothing <= 0.2
    assert trial.train.label_smoothing == values["train.label_smoothing"]
    assert trial.train.adversarial.epsilon == values["train.adversarial.epsilon"]

    # A range past what the config accepts is refused before any trial starts.
    bad = {**space, "train.label_smoothing": {"type": "uniform", "low": 0.0, "high": 1.0}}
    raw["tune"]["space"] = bad
    with pytest.raises(ConfigError, match="tune.space.train.label_smoothing"):
        validate_experiment(raw, check_files=False)


def test_regularisation_and_optimisation_settings_are_logged_as_params(tmp_path, monkeypatch):
    from lepton_ray.tracking import mlflow as tracking

    logged: dict[str, str] = {}

    class Client:  # what log_config hands the MLflow client, kept
        def log_batch(self, run_id, params=()):
            logged.update({p.key: p.value for p in params})

        def log_text(self, *args):
            pass

    monkeypatch.setattr(tracking, "client", lambda uri: Client())
    raw = _raw(
        tmp_path,
        model={"dropout": {"hidden": 0.2}},
        train={"label_smoothing": 0.1, "adversarial": {"method": "fgm", "epsilon": 0.5}},
    )
    cfg = validate_experiment(raw, check_files=False)
    tracking.log_config("sqlite:///unused.db", "run", cfg)
    params = logged
    expected = {
        "model.dropout.hidden": "0.2",
        "model.dropout.attention": "None",
        "train.label_smoothing": "0.1",
        "train.adversarial.method": "fgm",
        "train.adversarial.epsilon": "0.5",
        "train.weight_decay": "0.01",
        "train.max_grad_norm": "1.0",
        "train.warmup_ratio": "0.1",
        "train.lr_schedule": "linear",
        "train.early_stopping.patience": "None",
        "train.early_stopping.min_delta": "0.0",
    }
    assert {k: params.get(k) for k in expected} == expected
