"""Model artifacts: every stage can reload what another wrote, with the same outputs."""

import json
from pathlib import Path

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from lepton_ray.artifacts import META_FILE, ModelMeta, build_model, load_tokenizer
from lepton_ray.compress.formats import (
    INT8_WEIGHTS,
    load_model_artifact,
    quantize_dynamic_int8,
    save_int8_artifact,
)
from lepton_ray.config import ModelConfig, PeftSection, resolve_model_path, validate_experiment
from lepton_ray.errors import ConfigError, StageError
from lepton_ray.tasks.base import encode_texts
from lepton_ray.text import DEFAULT_CLEANING
from lepton_ray.train.checkpoint import (
    STATE_FILE,
    TRAINABLE_FILE,
    artifact_meta,
    restore_checkpoint,
    write_checkpoint,
)
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
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert (folder / TRAINABLE_FILE).is_file()
    loaded, _, loaded_meta = load_model_artifact(folder)
    assert loaded_meta.base_model == "./base"
    with torch.no_grad():
        expected = model(**_inputs()).logits
        got = loaded(**_inputs()).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_artifact_is_safetensors_and_reloads_to_identical_logits(tmp_path, per_channel):
    model = build_model(
        ModelConfig(name="minilm", random_init=True, config_overrides=TINY_BERT),
        "sequence_classification",
        LABELS,
    )
    model.eval()
    if per_channel:  # a later switch to per-channel weights needs no format change
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        qmodel = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig})
    else:
        qmodel = quantize_dynamic_int8(model)
    meta = ModelMeta(
        task="sequence_classification",
        labels=LABELS,
        base_model="minilm",
        max_length=32,
        weights="int8",
        cleaning={"unicode_form": "NFC", "lowercase": True},
    )
    save_int8_artifact(qmodel, load_tokenizer("minilm"), meta, tmp_path)
    assert (tmp_path / INT8_WEIGHTS).is_file() and (tmp_path / "config" / "config.json").is_file()
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))
    loaded, _, loaded_meta = load_model_artifact(tmp_path)
    assert loaded_meta.weights == "int8"
    assert loaded_meta.cleaning == {**DEFAULT_CLEANING, "unicode_form": "NFC", "lowercase": True}
    linears = [m for m in loaded.modules() if isinstance(m, DynamicLinear)]
    assert len(linears) == len([m for m in qmodel.modules() if isinstance(m, DynamicLinear)])
    scheme = torch.per_channel_affine if per_channel else torch.per_tensor_affine
    assert all(m.weight().qscheme() == scheme for m in linears)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**_inputs()).logits, qmodel(**_inputs()).logits, rtol=0, atol=0
        )


def test_model_meta_reads_old_files_and_ignores_unknown_keys(tmp_path):
    old = {"task": "sequence_classification", "labels": LABELS, "base_model": "minilm",
           "max_length": 32, "weights": "full", "from_the_future": 1}  # fmt: skip
    (tmp_path / META_FILE).write_text(json.dumps(old))
    meta = ModelMeta.load(tmp_path)
    assert meta.cleaning == DEFAULT_CLEANING and meta.cleaning is not DEFAULT_CLEANING
    meta.cleaning["lowercase"] = True
    assert DEFAULT_CLEANING["lowercase"] is False  # the default was copied, not shared


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": None}, "labels must be a list"),
        ({"weights": "pickle"}, "weights 'pickle' is not one of"),
        ({"cleaning": {"unicode_form": "NFX"}}, "cleaning.unicode_form 'NFX'"),
        ({"max_length": "32"}, "max_length must be an integer"),
    ],
)
def test_model_meta_refuses_bad_fields_with_one_line(tmp_path, change, message):
    data = {"task": "sequence_classification", "labels": LABELS, "base_model": "minilm",
            "max_length": 32, **change}  # fmt: skip
    (tmp_path / META_FILE).write_text(json.dumps(data))
    with pytest.raises(StageError, match=message):
        ModelMeta.load(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"task": "sequence_classification"}))
    with pytest.raises(StageError, match="missing field"):
        ModelMeta.load(tmp_path)


def _meta(**kw) -> ModelMeta:
    return ModelMeta("sequence_classification", LABELS, "minilm", kw.pop("max_length", 32), **kw)


def test_encode_texts_cleans_like_training_did():
    tok = load_tokenizer("minilm")
    meta = _meta()
    wide, _ = encode_texts(tok, meta, ["\uff34\uff48\uff45 lamp\u200b  works"])
    plain, truncated = encode_texts(tok, meta, ["The lamp works"])
    assert wide["input_ids"].tolist() == plain["input_ids"].tolist()
    assert truncated == [False]
    lower = _meta(cleaning={"unicode_form": "none", "lowercase": True})
    assert encode_texts(tok, lower, ["THE LAMP"])[0]["input_ids"].tolist() == (
        encode_texts(tok, meta, ["the lamp"])[0]["input_ids"].tolist()
    )


def test_encode_texts_truncates_at_max_length_and_says_which():
    tok = load_tokenizer("minilm")
    meta = _meta(max_length=8)
    exact = "one two three four five six"  # [CLS] + 6 words + [SEP] = 8 tokens: not cut
    texts = ["short", "word " * 50, exact]
    inputs, truncated = encode_texts(tok, meta, texts)
    assert inputs["input_ids"].shape == (3, 8)
    assert truncated == [False, True, False]
    inputs, truncated = encode_texts(tok, meta, texts, max_length=4)
    assert inputs["input_ids"].shape == (3, 4) and truncated == [False, True, True]


def test_checkpoint_carries_cleaning_and_resumes_from_weights_only_state(tmp_path):
    cfg = validate_experiment(
        smoke_config(tmp_path, Path(__file__), data={"clean": {"lowercase": True}})
    )
    meta = artifact_meta(cfg, LABELS)
    assert meta.cleaning == {**DEFAULT_CLEANING, "unicode_form": "NFKC", "lowercase": True}
    model = apply_peft(
        build_model(cfg.model, cfg.task, LABELS), PeftSection(method="lora"), cfg.task
    )
    opt = build_optimizer(model, 1e-3, 0.0)
    sched = build_scheduler(opt, 10, 0.1)
    batch = _inputs()
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    sched.step()
    history = [{"epoch": 1, "train_loss": 0.7, "val_accuracy": 0.5}]
    base_dir = tmp_path / "base"
    model.get_base_model().save_pretrained(base_dir)
    folder = write_checkpoint(
        tmp_path / "ckpt", model, load_tokenizer("minilm"), meta, opt, sched,
        LoopState(epoch=1, best=0.5, history=history), base_dir,
    )  # fmt: skip
    assert (folder / TRAINABLE_FILE).is_file()
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    assert "trainable" not in state and state["loop"]["history"] == history
    assert ModelMeta.load(folder).cleaning["lowercase"] is True

    fresh = apply_peft(
        build_model(cfg.model, cfg.task, LABELS, seed=1), PeftSection(method="lora"), cfg.task
    )
    fresh_opt = build_optimizer(fresh, 1e-3, 0.0)
    fresh_sched = build_scheduler(fresh_opt, 10, 0.1)
    resumed = restore_checkpoint(folder, fresh, fresh_opt, fresh_sched)
    assert (resumed.epoch, resumed.best, resumed.history) == (1, 0.5, history)
    assert fresh_sched.last_epoch == sched.last_epoch
    trained = dict(model.named_parameters())
    for name, param in fresh.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, trained[name], rtol=0, atol=0)
    saved_state = opt.state_dict()["state"]
    for key, value in fresh_opt.state_dict()["state"].items():
        torch.testing.assert_close(value["exp_avg"], saved_state[key]["exp_avg"])


def test_max_length_above_the_models_positions_is_refused_at_validate(tmp_path):
    """The check reads model.name's config.json (with model.config_overrides): MiniLM has
    512 positions, RoBERTa-style models lose pad_token_id + 1 of theirs to the offset."""

    def config(max_length: int, **model):
        raw = smoke_config(tmp_path, Path(__file__))
        raw["data"]["max_length"] = max_length
        raw["model"] = {**raw["model"], **model}
        return validate_experiment(raw)

    with pytest.raises(ConfigError) as err:
        config(1024)
    assert "data.max_length 1024" in str(err.value)
    assert "max_position_embeddings 512" in str(err.value)
    assert config(512).data.max_length == 512
    # A random model built with more positions takes longer texts.
    overrides = {"max_position_embeddings": 2048}
    assert config(1024, config_overrides=overrides).data.max_length == 1024

    roberta = tmp_path / "roberta"
    roberta.mkdir()
    (roberta / "config.json").write_text(
        json.dumps({"model_type": "roberta", "max_position_embeddings": 66, "pad_token_id": 1})
    )
    with pytest.raises(ConfigError, match="max_position_embeddings 66 .* 64 hold tokens"):
        config(65, name=str(roberta), config_overrides={})
    assert config(64, name=str(roberta), config_overrides={}).data.max_length == 64
