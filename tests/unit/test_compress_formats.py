"""Compressed artifact formats: each reloads to the logits that compress measured."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from lepton_ray.artifacts import ModelMeta, build_model, load_tokenizer, save_float_artifact
from lepton_ray.compress.formats import (
    INT8_WEIGHTS,
    load_model_artifact,
    quantize_dynamic_int8,
    save_int8_artifact,
)
from lepton_ray.compress.modules import Int8Embedding
from lepton_ray.config import ModelConfig
from lepton_ray.errors import StageError
from lepton_ray.tasks.base import encode_texts
from tests.conftest import TINY_BERT

LABELS = ["neg", "pos"]
TASK = "sequence_classification"
TEXTS = ["the lamp works", "it broke at once , sadly", "fine"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def tiny_bert(seed: int = 0):
    """2 layers, hidden 64, MiniLM's 30,522-token vocabulary; random weights, eval mode."""
    model = build_model(
        ModelConfig(name="minilm", random_init=True, config_overrides=TINY_BERT),
        TASK,
        LABELS,
        seed=seed,
    )
    return model.eval()


def _meta(weights: str, method: str = "dynamic_int8") -> ModelMeta:
    return ModelMeta(TASK, LABELS, "minilm", 32, weights=weights, extra={"quantization": method})


def _logits(model, tokenizer, meta):
    encoded, _ = encode_texts(tokenizer, meta, TEXTS)
    with torch.inference_mode():
        return model(**encoded).logits


def test_int8_recipe_keeps_the_head_float_and_quantizes_embeddings_per_row(tmp_path, tokenizer):
    model = tiny_bert()
    qmodel = quantize_dynamic_int8(
        model, per_channel=True, keep_float=["classifier"], embeddings=True
    )
    assert isinstance(model.classifier, torch.nn.Linear)  # the source is not changed
    assert isinstance(qmodel.classifier, torch.nn.Linear)
    assert not isinstance(qmodel.classifier, DynamicLinear)
    assert isinstance(qmodel.bert.pooler.dense, DynamicLinear)
    assert qmodel.bert.pooler.dense.weight().qscheme() == torch.per_channel_affine
    word = qmodel.bert.embeddings.word_embeddings
    assert isinstance(word, Int8Embedding) and word.weight_int8.dtype == torch.int8
    # per-row symmetric scales: every entry within half a step of the float table
    error = (word.weight - model.bert.embeddings.word_embeddings.weight).abs()
    assert bool((error <= word.scale[:, None] / 2 + 1e-7).all())

    meta = _meta("int8")
    save_int8_artifact(qmodel, tokenizer, meta, tmp_path)
    loaded, _, loaded_meta = load_model_artifact(tmp_path)
    assert loaded_meta.weights == "int8" and loaded_meta.extra["quantization"] == "dynamic_int8"
    assert isinstance(loaded.bert.embeddings.word_embeddings, Int8Embedding)
    assert not isinstance(loaded.classifier, DynamicLinear)
    torch.testing.assert_close(
        _logits(loaded, tokenizer, meta), _logits(qmodel, tokenizer, meta), rtol=0, atol=0
    )
    with safe_open(str(tmp_path / INT8_WEIGHTS), framework="pt") as handle:
        layout = json.loads(handle.metadata()["quantized"])
        word_dtype = handle.get_slice("bert.embeddings.word_embeddings.weight_int8").get_dtype()
    assert layout["bert.embeddings.word_embeddings"]["kind"] == "embedding_int8"
    assert "classifier" not in layout and word_dtype == "I8"


def test_an_int8_file_written_by_the_v1_format_still_loads(tmp_path, tokenizer):
    """Artifacts from before per-channel/embedding support: every Linear, no 'kind'."""
    qmodel = quantize_dynamic_int8(tiny_bert())
    meta = _meta("int8")
    save_int8_artifact(qmodel, tokenizer, meta, tmp_path)
    path = tmp_path / INT8_WEIGHTS
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        layout = json.loads(handle.metadata()["quantized"])
    for entry in layout.values():
        del entry["kind"]
    save_file(
        tensors,
        str(path),
        metadata={"format": "lepton-int8-dynamic-v1", "quantized": json.dumps(layout)},
    )
    loaded, _, _ = load_model_artifact(tmp_path)
    torch.testing.assert_close(
        _logits(loaded, tokenizer, meta), _logits(qmodel, tokenizer, meta), rtol=0, atol=0
    )
    # v1 promised every Linear quantized: a v1 file that leaves one out is refused
    del layout["classifier"]
    save_file(
        tensors,
        str(path),
        metadata={"format": "lepton-int8-dynamic-v1", "quantized": json.dumps(layout)},
    )
    with pytest.raises(StageError, match="missing quantized modules"):
        load_model_artifact(tmp_path)


def test_an_int8_layout_naming_a_module_the_config_lacks_is_refused(tmp_path, tokenizer):
    qmodel = quantize_dynamic_int8(tiny_bert(), embeddings=True)
    save_int8_artifact(qmodel, tokenizer, _meta("int8"), tmp_path)
    path = tmp_path / INT8_WEIGHTS
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        meta = handle.metadata()
    layout = json.loads(meta["quantized"])
    layout["bert.no_such_layer"] = {"kind": "embedding_int8"}
    save_file(tensors, str(path), metadata={**meta, "quantized": json.dumps(layout)})
    with pytest.raises(StageError, match="unknown quantized modules"):
        load_model_artifact(tmp_path)


def test_bf16_artifact_reloads_in_bf16_and_answers_with_bf16_logits(tmp_path, tokenizer):
    model = tiny_bert().to(torch.bfloat16)
    meta = _meta("bf16", "bf16")
    save_float_artifact(model, tokenizer, meta, tmp_path)
    loaded, _, loaded_meta = load_model_artifact(tmp_path)
    assert loaded_meta.weights == "bf16"
    assert next(loaded.parameters()).dtype == torch.bfloat16
    got = _logits(loaded, tokenizer, meta)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, _logits(model, tokenizer, meta), rtol=0, atol=0)
    size = (tmp_path / "model" / "model.safetensors").stat().st_size
    params = sum(p.numel() for p in model.parameters())
    assert size < 2.1 * params  # two bytes a weight, plus the header


def test_a_gpu_weight_only_artifact_is_refused_clearly_without_a_gpu(tmp_path, tokenizer):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    meta = _meta("gpu_weight_only", "int8_weight_only")
    save_float_artifact(tiny_bert().to(torch.bfloat16), tokenizer, meta, tmp_path)
    with pytest.raises(StageError, match="int8_weight_only model runs on a CUDA GPU"):
        load_model_artifact(tmp_path)


def test_init_from_continues_from_an_artifact_and_refuses_what_cannot_train(tmp_path, tokenizer):
    """model.init_from (retrain): the artifact's weights come back trainable; an int8
    artifact, or one whose labels differ from the data's, is one ConfigError."""
    from lepton_ray.errors import ConfigError

    model = tiny_bert(seed=3)
    save_float_artifact(model, tokenizer, _meta("full", "none"), tmp_path / "full")
    again = build_model(
        ModelConfig(name="minilm", init_from=str(tmp_path / "full")), TASK, LABELS, seed=0
    )
    assert again.training
    assert all(p.requires_grad for p in again.parameters())
    assert torch.allclose(
        _logits(again.eval(), tokenizer, _meta("full")), _logits(model, tokenizer, _meta("full"))
    )

    with pytest.raises(ConfigError, match="labels"):
        build_model(ModelConfig(init_from=str(tmp_path / "full")), TASK, ["a", "b", "c"])
    q = quantize_dynamic_int8(model)
    save_int8_artifact(q, tokenizer, _meta("int8"), tmp_path / "int8")
    with pytest.raises(ConfigError, match="cannot be trained"):
        build_model(ModelConfig(init_from=str(tmp_path / "int8")), TASK, LABELS)
    with pytest.raises(ConfigError, match="not a lepton-ray model artifact"):
        build_model(ModelConfig(init_from=str(tmp_path)), TASK, LABELS)
    with pytest.raises(ValueError, match="exclude each other"):
        ModelConfig(init_from=str(tmp_path / "full"), random_init=True)
