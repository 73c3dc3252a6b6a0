"""Model artifacts: every stage can reload what another wrote, with the same outputs."""

import tempfile
from pathlib import Path

import pytest
import torch

from lepton_ray.config import ModelConfig, PeftSection, validate_experiment
from lepton_ray.errors import ConfigError
from lepton_ray.models import (
    build_model,
    load_model_artifact,
    load_tokenizer,
    quantize_dynamic_int8,
    resolve_model_path,
    save_int8_artifact,
)
from lepton_ray.train.checkpoint import artifact_meta, write_checkpoint
from lepton_ray.train.loop import LoopState, build_optimizer, build_scheduler
from lepton_ray.train.peft import apply_peft
from tests.conftest import TINY_BERT, smoke_config

LABELS = ["neg", "pos", "neutral"]


def test_alias_resolves_to_the_packaged_pretrained_minilm():
    folder = Path(resolve_model_path("minilm"))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert resolve_model_path(str(folder)) == str(folder)  # a local folder works the same way
    assert resolve_model_path("org/some-model") == "org/some-model"  # a hub id is passed on
    with pytest.raises(ConfigError, match="folder not found"):
        resolve_model_path("./no/such/folder")


def test_pretrained_minilm_loads_with_a_new_head():
    model = build_model(ModelConfig(name="minilm"), "sequence_classification", LABELS)
    assert model.config.num_labels == 3
    assert model.config.id2label[2] == "neutral"
    assert model.config.num_hidden_layers == 6


def _inputs():
    tok = load_tokenizer("minilm")
    return tok(["the lamp works", "it broke at once"], return_tensors="pt", padding=True)


def test_random_base_lora_checkpoint_round_trip(tmp_path):
    cfg = validate_experiment(smoke_config(tmp_path, Path(__file__)))
    base = build_model(cfg.model, cfg.task, LABELS, seed=0)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    model = apply_peft(base, PeftSection(method="lora"), cfg.task)
    with torch.no_grad():  # make the adapter non-trivial so a lost adapter would show
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    opt = build_optimizer(model, 1e-3, 0.0)
    meta = artifact_meta(cfg, LABELS)
    folder = write_checkpoint(
        tmp_path / "ckpt",
        model,
        load_tokenizer("minilm"),
        meta,
        opt,
        build_scheduler(opt, 10, 0.1),
        LoopState(epoch=1),
        base_dir,
    )
    loaded, _, loaded_meta = load_model_artifact(folder)
    assert loaded_meta.base_model == "./base"
    with torch.no_grad():
        expected = model(**_inputs()).logits
        got = loaded(**_inputs()).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_int8_artifact_round_trip_is_smaller_and_identical():
    model = build_model(
        ModelConfig(name="minilm", random_init=True, config_overrides=TINY_BERT),
        "sequence_classification",
        LABELS,
    )
    model.eval()
    qmodel = quantize_dynamic_int8(model)
    with tempfile.TemporaryDirectory() as tmp:
        from lepton_ray.models import ModelMeta

        meta = ModelMeta(
            task="sequence_classification",
            labels=LABELS,
            base_model="minilm",
            max_length=32,
            weights="int8",
        )
        save_int8_artifact(qmodel, load_tokenizer("minilm"), meta, Path(tmp))
        loaded, _, loaded_meta = load_model_artifact(tmp)
        assert loaded_meta.weights == "int8"
        assert any("quantized" in type(m).__module__ for m in loaded.modules())
        with torch.no_grad():
            torch.testing.assert_close(loaded(**_inputs()).logits, qmodel(**_inputs()).logits)
