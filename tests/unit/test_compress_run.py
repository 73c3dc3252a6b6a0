"""``run_compress`` end to end on a tiny random BERT: metrics, artifact, gate, bad input.

The gate tests measure real predictions of the loaded artifacts: the compression gate judges
tune.metric too, and the compressed model carries every metric the promotion gate may compare.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from lepton_ray.artifacts import META_FILE, ModelMeta, load_tokenizer, save_model_artifact
from lepton_ray.compress import quantize
from lepton_ray.compress.formats import load_model_artifact
from lepton_ray.config import validate_experiment
from lepton_ray.errors import StageError
from lepton_ray.pipeline import _compressed_metrics
from lepton_ray.registry import versions
from lepton_ray.tasks import get_task
from lepton_ray.tasks.classification_eval import metrics_from_confusion
from tests.conftest import smoke_config
from tests.unit.test_compress_formats import LABELS, TASK, tiny_bert

TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés",
    "an utterly charming and hilarious film",
    "it 's a bad sign when you 're rooting for the villain",
    "a masterpiece of quiet intensity",
    "dull , lifeless and far too long",
] * 6

REQUIRED = {
    "size_mb_fp32",
    "size_mb_compressed",
    "size_ratio",
    "val_accuracy_fp32",
    "val_accuracy_compressed",
    "val_accuracy_drop",
    "val_macro_f1_fp32",
    "val_macro_f1_compressed",
    "test_accuracy_fp32",
    "test_accuracy_compressed",
    "samples_per_s_fp32",
    "samples_per_s_compressed",
    "latency_ms_batch1_fp32",
    "latency_ms_batch1_compressed",
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture
def logged(monkeypatch):
    """MLflow calls recorded instead of made (no tracking server in unit tests)."""
    from lepton_ray.tracking import mlflow as tracking

    calls: dict[str, list] = {"metrics": [], "figures": [], "folders": []}
    monkeypatch.setattr(
        tracking, "log_metrics", lambda uri, run, m, step: calls["metrics"].append(m)
    )
    monkeypatch.setattr(
        tracking, "log_figure", lambda uri, run, fig, path: calls["figures"].append(path)
    )
    monkeypatch.setattr(
        tracking,
        "log_folder",
        lambda uri, run, folder, path: calls["folders"].append((folder, path)),
    )
    return calls


def answers(model, tokenizer) -> list[int]:
    """``model``'s predicted class for each of TEXTS."""
    with torch.inference_mode():
        encoded = tokenizer(
            TEXTS, truncation=True, max_length=32, padding=True, return_tensors="pt"
        )
        return model(**encoded).logits.argmax(-1).tolist()


def _config(tmp_path: Path, tokenizer, labels=None, tune=None, **compress):
    """Every split = TEXTS labelled ``labels`` (default: the float model's own answers, so
    fp32 accuracy is 1.0 and a flip shows as a drop)."""
    source = tmp_path / "reviews.csv"  # the config names a data file; the stage reads Parquet
    pd.DataFrame({"review": TEXTS, "sentiment": LABELS * (len(TEXTS) // 2)}).to_csv(source)
    sections = {"compress": compress} | ({"tune": tune} if tune else {})
    cfg = validate_experiment(smoke_config(tmp_path, source, **sections))
    ids = tokenizer(TEXTS, truncation=True, max_length=32)["input_ids"]
    labels = answers(tiny_bert(), tokenizer) if labels is None else labels
    frame = pd.DataFrame({"input_ids": ids, "label_id": labels})
    for split in ("train", "validation", "test"):
        (cfg.data_dir / split).mkdir(parents=True)
        frame.to_parquet(cfg.data_dir / split / "part-0.parquet")
    manifest = {
        "model": cfg.model.name,
        "max_length": cfg.data.max_length,
        "splits": dict.fromkeys(("train", "validation", "test"), len(frame)),
    }
    (cfg.data_dir / "manifest.json").write_text(json.dumps(manifest))
    return cfg


def _source(tmp_path: Path, tokenizer, model=None) -> Path:
    folder = tmp_path / "source"
    meta = ModelMeta(TASK, LABELS, "minilm", 32, weights="full")
    save_model_artifact(tiny_bert() if model is None else model, tokenizer, meta, folder)
    return folder


@pytest.mark.parametrize("method", ["dynamic_int8", "bf16"])
def test_run_compress_writes_a_loadable_artifact_and_logs_the_contract_metrics(
    tmp_path, tokenizer, logged, method
):
    cfg = _config(tmp_path, tokenizer, method=method, max_drop=100.0)
    lines: list[str] = []
    result = quantize.run_compress(
        cfg, _source(tmp_path, tokenizer), tmp_path / "out", "run-1", log=lines.append
    )
    assert result.accepted and result.method == method and result.folder is not None
    assert set(result.metrics) >= REQUIRED, REQUIRED - set(result.metrics)
    m = result.metrics
    assert m["val_accuracy_drop"] == pytest.approx(
        m["val_accuracy_fp32"] - m["val_accuracy_compressed"]
    )
    assert m["size_mb_compressed"] < m["size_mb_fp32"]
    assert logged["metrics"] == [m]
    assert logged["folders"] == [(result.folder, "model")]
    assert any(p.endswith(f"validation_{method}.png") for p in logged["figures"])
    meta = json.loads((result.folder / META_FILE).read_text())
    assert meta["weights"] == {"dynamic_int8": "int8", "bf16": "bf16"}[method]
    assert meta["extra"]["quantization"] == method
    model, tok, loaded_meta = load_model_artifact(result.folder)
    model.eval()
    encoded = tok(["a fine film"], return_tensors="pt")
    with torch.inference_mode():
        assert model(**encoded).logits.float().shape == (1, 2)
    summary = [line for line in lines if "MB ->" in line]
    assert len(summary) == 1 and "val accuracy" in summary[0] and "samples/s" in summary[0]


def test_an_int8_model_that_loses_accuracy_is_refused_and_not_logged(
    tmp_path, tokenizer, logged, monkeypatch
):
    """The gate: a drop over compress.max_drop leaves no folder and no model artifact."""
    real = quantize.quantize_dynamic_int8

    def broken(model, **kwargs):
        qmodel = real(model, **kwargs)
        with torch.no_grad():  # swap the two classes: every prediction flips
            qmodel.classifier.weight.copy_(qmodel.classifier.weight.flip(0))
            qmodel.classifier.bias.copy_(qmodel.classifier.bias.flip(0))
        return qmodel

    monkeypatch.setattr(quantize, "quantize_dynamic_int8", broken)
    cfg = _config(tmp_path, tokenizer, method="dynamic_int8", max_drop=1.0)
    lines: list[str] = []
    result = quantize.run_compress(
        cfg, _source(tmp_path, tokenizer), tmp_path / "out", "run-1", log=lines.append
    )
    assert not result.accepted and result.folder is None
    assert result.metrics["val_prediction_agreement"] == 0.0
    assert "accuracy drop 100.00 points: more than compress.max_drop 1" in result.reason
    assert logged["folders"] == [] and logged["metrics"][0]["accepted"] == 0.0
    assert any(line.startswith("[compress] refused:") for line in lines)


def test_sensitive_layers_are_ranked_on_training_rows_and_kept_float(tmp_path, tokenizer, logged):
    cfg = _config(tmp_path, tokenizer, method="dynamic_int8", max_drop=100.0, sensitive_layers=2)
    lines: list[str] = []
    result = quantize.run_compress(
        cfg, _source(tmp_path, tokenizer), tmp_path / "out", "run-1", log=lines.append
    )
    kept = json.loads((result.folder / META_FILE).read_text())["extra"]["compression"]
    assert kept["keep_float"][0] == "classifier" and len(kept["keep_float"]) == 3
    model, _, _ = load_model_artifact(result.folder)
    for name in kept["keep_float"]:
        assert type(model.get_submodule(name)) is torch.nn.Linear
    assert any("most sensitive" in line for line in lines)


def test_disabled_compression_does_nothing(tmp_path, tokenizer, logged):
    cfg = _config(tmp_path, tokenizer, enabled=False)
    result = quantize.run_compress(cfg, tmp_path / "nowhere", tmp_path / "out", "r", log=print)
    assert (result.method, result.folder, result.accepted) == ("none", None, False)
    assert logged["metrics"] == []


def test_an_adapter_that_does_not_match_its_base_is_one_stage_error(tmp_path, tokenizer, logged):
    """A LoRA adapter trained on another base (other hidden size): one line, no traceback."""
    from peft import LoraConfig, get_peft_model

    from lepton_ray.artifacts import build_model
    from lepton_ray.config import ModelConfig

    other = build_model(
        ModelConfig(
            name="minilm",
            random_init=True,
            config_overrides={"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2},
        ),
        TASK,
        LABELS,
    )
    peft_model = get_peft_model(
        other, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    folder = tmp_path / "lora"
    base = tmp_path / "lora" / "base"
    tiny_bert().save_pretrained(base)  # the base the artifact names: hidden size 64
    meta = ModelMeta(TASK, LABELS, "./base", 32, weights="adapter", peft_method="lora")
    save_model_artifact(peft_model, tokenizer, meta, folder)
    cfg = _config(tmp_path, tokenizer, method="dynamic_int8")
    with pytest.raises(StageError) as err:
        quantize.run_compress(cfg, folder, tmp_path / "out", "r", log=print)
    message = str(err.value)
    assert "\n" not in message and "adapter" in message and "does not match" in message


PATTERN = [1, 0, 1, 0, 0, 0]
"""The class the float model predicts for each distinct text of TEXTS (repeated 6 times)."""


def separating_bert(tokenizer):
    """tiny_bert with its head fitted (least squares on the centred pooled outputs, in float64)
    so that it answers PATTERN with logits +-1: a float model that predicts both classes."""
    model = tiny_bert()
    distinct = TEXTS[: len(PATTERN)]
    encoded = tokenizer(distinct, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.inference_mode():
        pooled = model.bert(**encoded).pooler_output.double()
    targets = torch.tensor([[-1.0, 1.0] if p else [1.0, -1.0] for p in PATTERN]).double()
    mean = pooled.mean(dim=0)
    weight = torch.linalg.pinv(pooled - mean) @ (targets - targets.mean(dim=0))
    with torch.no_grad():
        model.classifier.weight.copy_(weight.T.float())
        model.classifier.bias.copy_((targets.mean(dim=0) - mean @ weight).float())
    return model


def labels_for(predicted: list[int]) -> list[int]:
    """Labels on which the float model (``predicted``) and a model that always answers 1 are
    equally accurate: every row it calls 1 is 1; half of the rows it calls 0 are 1."""
    labels, zeros = [], 0
    for p in predicted:
        zeros += p == 0
        labels.append(1 if p == 1 or zeros % 2 == 0 else 0)
    return labels


def always_positive(real):
    """A 'compression' that answers class 1 on every row (int8 encoder, head zeroed)."""

    def compress(model, **kwargs):
        qmodel = real(model, **kwargs)
        with torch.no_grad():
            qmodel.classifier.weight.zero_()
            qmodel.classifier.bias.copy_(torch.tensor([-5.0, 5.0]))
        return qmodel

    return compress


@pytest.fixture
def float_model(tokenizer):
    model = separating_bert(tokenizer)
    assert answers(model, tokenizer) == PATTERN * (len(TEXTS) // len(PATTERN))
    return model


def test_the_compressed_candidate_carries_every_metric_tune_metric_may_name(
    tmp_path, tokenizer, logged, float_model
):
    predicted = answers(float_model, tokenizer)
    cfg = _config(
        tmp_path,
        tokenizer,
        labels=labels_for(predicted),
        tune={"metric": "val_macro_precision"},
        method="dynamic_int8",
        max_drop=100.0,
    )
    result = quantize.run_compress(
        cfg, _source(tmp_path, tokenizer, float_model), tmp_path / "out", "run-1", log=print
    )
    assert result.accepted
    m = result.metrics
    metrics = get_task(cfg.task).metrics
    gate_metrics = sorted(name for name in metrics if name.startswith("val_"))
    assert "val_macro_precision" in gate_metrics
    for name in gate_metrics:
        assert f"{name}_fp32" in m and f"{name}_compressed" in m, name
    # What the registry records on the compressed version, under the names the gate reads.
    candidate = versions.Candidate(
        metrics=_compressed_metrics(m),
        metric_name=cfg.tune.metric,
        metric_mode=cfg.tune.mode,
        eval_split="x:validation",
        peft_method="none",
        quantization=result.method,
    )
    tags = candidate.tags()
    assert tags[versions.TAG_METRIC_NAME] == "val_macro_precision"
    for name in gate_metrics:
        assert float(tags[f"{versions.METRIC_PREFIX}{name}"]) == pytest.approx(
            m[f"{name}_compressed"], rel=1e-5
        ), name
    # The float model's macro precision is the one its confusion matrix gives.
    labels = labels_for(predicted)
    confusion = [[0, 0], [0, 0]]
    for y, p in zip(labels, predicted, strict=True):
        confusion[y][p] += 1
    assert m["val_macro_precision_fp32"] == pytest.approx(
        metrics_from_confusion(confusion)["macro_precision"]
    )
    assert "macro precision drop" in result.reason


@pytest.mark.parametrize(
    ("metric", "mode", "worse"),
    [("val_macro_precision", "max", "macro precision drop"), ("val_loss", "min", "loss rise")],
)
def test_a_compression_that_keeps_accuracy_but_loses_the_gate_metric_is_refused(
    tmp_path, tokenizer, logged, monkeypatch, float_model, metric, mode, worse
):
    monkeypatch.setattr(
        quantize, "quantize_dynamic_int8", always_positive(quantize.quantize_dynamic_int8)
    )
    cfg = _config(
        tmp_path,
        tokenizer,
        labels=labels_for(answers(float_model, tokenizer)),
        tune={"metric": metric, "mode": mode},
        method="dynamic_int8",
        max_drop=1.0,
    )
    lines: list[str] = []
    result = quantize.run_compress(
        cfg, _source(tmp_path, tokenizer, float_model), tmp_path / "out", "run-1", log=lines.append
    )
    m = result.metrics
    assert m["val_accuracy_fp32"] == pytest.approx(2 / 3)  # a real, imperfect float model
    assert m["val_accuracy_drop"] == pytest.approx(0.0)  # accuracy alone would let it through
    assert m["val_prediction_agreement"] == pytest.approx(1 / 3)
    assert not result.accepted and result.folder is None
    assert m["val_macro_precision_drop"] == pytest.approx(0.75 - 1 / 3)
    assert m["val_loss_rise"] > 0.5
    assert f"{worse} " in result.reason and "more than compress.max_drop 1" in result.reason
    assert "accuracy drop 0.00 points" in result.reason
    assert logged["folders"] == [] and logged["metrics"][0]["accepted"] == 0.0
    assert any(line.startswith("[compress] refused:") for line in lines)
    # Judged on accuracy only, the same compression passes: the gate metric refused it.
    assert quantize.judge(m, "dynamic_int8", "val_accuracy", 1.0, "accuracy")[0]
