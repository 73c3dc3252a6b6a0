"""Compression of a causal language model, without Ray: the perplexity gate (a relative
rise, ``compress.max_ppl_increase``), the split batches read with the task's per-token
target columns, generation speed, the int8 format of a model with tied embeddings (loads,
generates), and onnx_int8 refused for a model that generates."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from lepton_ray.artifacts import ModelMeta, load_tokenizer, save_model_artifact
from lepton_ray.compress import measure, quantize
from lepton_ray.compress.formats import (
    INT8_WEIGHTS,
    load_model_artifact,
    quantize_dynamic_int8,
    save_int8_artifact,
)
from lepton_ray.compress.modules import CudaModel, Int8Embedding
from lepton_ray.config import CompressSection, resolve_model_path, validate_experiment
from lepton_ray.data.split_files import open_split
from lepton_ray.errors import ConfigError
from lepton_ray.tasks import get_task
from lepton_ray.tasks.chat import IGNORE, canonical
from tests.conftest import TINY_LLAMA, smoke_config

TASK = get_task("causal_lm")
MAX_LENGTH = 64
SAMPLES = 3
CHATS = [
    [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a + b}"},
    ]
    for a, b in [(2, 3), (10, 7), (21, 4), (5, 5), (8, 1), (30, 12), (3, 3), (9, 9), (11, 2)]
] + [
    [
        {"role": "system", "content": "Answer in upper case."},
        {"role": "user", "content": f"Say {word}."},
        {"role": "assistant", "content": word.upper()},
    ]
    for word in ("river", "stone", "lamp", "garden", "cloud", "music", "apple")
]


# ------------------------------------------------------------------------------ the gate
def _gate_metrics(before: float, after: float, **others: tuple[float, float]) -> dict:
    """Validation metrics as run_compress logs them: each score fp32/compressed and its
    worsening under the gate's key."""
    scores = {"perplexity": (before, after), **others}
    m = {}
    for name, (was, now) in scores.items():
        m[f"val_{name}_fp32"], m[f"val_{name}_compressed"] = was, now
        m[quantize._worsening_key("val", name)] = quantize._worsening(name, was, now)
    return m


def test_the_default_limit_is_five_percent_of_perplexity():
    assert CompressSection().max_ppl_increase == 0.05
    assert quantize._worsening_key("val", "perplexity") == "val_perplexity_increase"
    assert quantize._worsening("perplexity", 20.0, 21.2) == pytest.approx(0.06)


def test_a_six_percent_perplexity_rise_is_refused_and_four_percent_accepted():
    # max_drop (points) does not judge a perplexity: 100 points would let anything through.
    ok, why = quantize.judge(
        _gate_metrics(20.0, 21.2), "dynamic_int8", "val_perplexity", 100.0, "perplexity", 0.05
    )
    assert not ok
    assert "perplexity increase 6.00%: more than compress.max_ppl_increase 0.05" in why
    ok, why = quantize.judge(
        _gate_metrics(20.0, 20.8), "dynamic_int8", "val_perplexity", 0.0, "perplexity", 0.05
    )
    assert ok, why
    assert "perplexity increase 4.00%, within compress.max_ppl_increase 0.05" in why
    # A lower perplexity is no worsening; a nan one (a diverged model) fails.
    assert quantize.judge(_gate_metrics(20.0, 15.0), "bf16", "val_perplexity", 0.0, "perplexity")[0]
    assert not quantize.judge(
        _gate_metrics(20.0, math.nan), "bf16", "val_perplexity", 100.0, "perplexity", 1.0
    )[0]


def test_other_scores_of_a_language_model_keep_max_drop_in_points():
    m = _gate_metrics(20.0, 20.2, rouge_l=(0.50, 0.47))  # perplexity +1%, ROUGE-L -3 points
    ok, why = quantize.judge(m, "dynamic_int8", "val_rouge_l", 1.0, "perplexity", 0.05)
    assert not ok
    assert "rouge l drop 3.00 points: more than compress.max_drop 1" in why
    assert "perplexity increase 1.00%" in why
    ok, why = quantize.judge(m, "dynamic_int8", "val_rouge_l", 5.0, "perplexity", 0.05)
    assert ok and "within compress.max_ppl_increase 0.05 and compress.max_drop 5" in why


# ------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def lm(tmp_path_factory, smollm2_path):
    """A causal-LM experiment whose splits are on disk as the data stage writes them (ids,
    per-token labels and parts, text and raw_text), a tiny random Llama with SmolLM2's
    tokenizer and template, and its artifact metadata."""
    tmp = tmp_path_factory.mktemp("compress_lm")
    source = tmp / "chats.jsonl"
    source.write_text("".join(json.dumps({"messages": t}) + "\n" for t in CHATS))
    raw = smoke_config(tmp, source, name="lmc")
    raw["task"] = "causal_lm"
    raw["data"] = {"path": str(source), "max_length": MAX_LENGTH, "chat": {"format": "messages"}}
    raw["model"] = {"name": "smollm2", "random_init": True, "config_overrides": TINY_LLAMA}
    raw["train"] = {"generation": {"samples": SAMPLES, "max_new_tokens": 4}}
    raw["tune"] = {"enabled": False, "metric": "val_perplexity"}
    cfg = validate_experiment(raw)
    options = {"template": "tokenizer", "format": "messages", "train_on_prompt": False}
    encode = TASK.encoder(cfg.model.name, MAX_LENGTH, {**options, "too_long": "drop"})
    texts = [canonical(turns) for turns in CHATS]
    encoded = encode(texts)
    assert not any(encoded["drop"])
    frame = pd.DataFrame(
        {
            "text": texts,
            "raw_text": texts,
            "input_ids": encoded["input_ids"],
            "labels": encoded["labels"],
            "parts": encoded["parts"],
        }
    )
    for split in ("train", "validation", "test"):
        (cfg.data_dir / split).mkdir(parents=True)
        frame.to_parquet(cfg.data_dir / split / "part-0.parquet")
    manifest = {
        "model": cfg.model.name,
        "max_length": MAX_LENGTH,
        "labels": [],
        "splits": dict.fromkeys(("train", "validation", "test"), len(frame)),
    }
    (cfg.data_dir / "manifest.json").write_text(json.dumps(manifest))
    tokenizer = TASK.prepare_tokenizer(load_tokenizer(cfg.model.name), cfg)
    meta = ModelMeta(
        "causal_lm", [], "./base", MAX_LENGTH, weights="full", extra=TASK.meta_extra(tokenizer, cfg)
    )
    model = TASK.build_model(resolve_model_path("smollm2"), cfg.model, [], seed=0).eval()
    assert model.config.tie_word_embeddings  # SmolLM2 ties its head to the embeddings
    return {"tmp": tmp, "raw": raw, "cfg": cfg, "frame": frame, "tokenizer": tokenizer,
            "meta": meta, "model": model}  # fmt: skip


def test_causal_lm_batches_are_read_with_the_tasks_target_columns(lm):
    cfg, frame, tokenizer = lm["cfg"], lm["frame"], lm["tokenizer"]
    assert measure.split_columns(TASK) == ["input_ids", "labels", "parts"]
    classifier = get_task("sequence_classification")
    assert measure.split_columns(classifier) == ["input_ids", classifier.target_column]
    # What the stage read before: the task's first target column alone cannot be batched.
    with pytest.raises(KeyError, match="parts"):
        rows = open_split(cfg, "validation", ["input_ids", TASK.target_column])
        next(TASK.frame_batches(next(iter(rows)), 4, 0))

    data = measure.evaluation_set(cfg, TASK, "validation", tokenizer, lm["meta"])
    assert data.rows.columns == ["input_ids", "labels", "parts"]
    batches = list(data)
    assert sum(len(b["input_ids"]) for b in batches) == len(frame)
    first = batches[0]
    assert set(first) == {"input_ids", "attention_mask", "labels"}
    assert first["labels"].shape == first["input_ids"].shape  # per token, not per row
    for row in range(len(first["input_ids"])):
        n = int(first["attention_mask"][row].sum())
        assert first["input_ids"][row, :n].tolist() == list(frame["input_ids"][row])
        assert first["labels"][row, :n].tolist() == list(frame["labels"][row])
        assert (first["labels"][row, n:] == IGNORE).all()
        trained = (first["labels"][row, :n] != IGNORE).sum()
        assert 0 < trained < n  # the prompt is not trained, the answer is
    # The task's generation sample came along (from the split's texts, by the template).
    assert data.generation is not None and len(data.generation.prompts) == SAMPLES
    assert data.generation.references[0] == "5"  # 2 plus 3

    calibration = quantize._calibration_batches(cfg, tokenizer)
    assert sum(len(b["input_ids"]) for b in calibration) == len(frame)
    assert all(b["labels"].shape == b["input_ids"].shape for b in calibration)


def test_a_generating_model_is_timed_in_generated_tokens_per_second(lm):
    data = measure.evaluation_set(lm["cfg"], TASK, "validation", lm["tokenizer"], lm["meta"])
    evaluated = measure.evaluate(TASK, lm["model"], data, [])
    scores = evaluated["scores"]
    assert 1.0 < scores["perplexity"] < math.inf and not math.isnan(scores["rouge_l"])
    assert len(evaluated["result"]["generations"]) == SAMPLES
    figures = measure.speed(TASK, lm["model"], data, measure.pad_id(lm["tokenizer"]), evaluated)
    assert figures["tokens_per_s_batch1"] > 0 and figures["tokens_per_s_batch8"] > 0
    assert figures["latency_ms_batch1"] > 0
    assert "samples_per_s" not in figures  # a language model's evaluation counts tokens


def test_a_classifier_keeps_its_forward_pass_speed_figures():
    from tests.unit.test_compress_formats import tiny_bert

    task = get_task("sequence_classification")
    model = tiny_bert()
    batches = [task.collate([[101, 2000 + i, 102] for i in range(4)], [0, 1, 0, 1], 0)]
    evaluated = measure.evaluate(task, model, batches, ["neg", "pos"])
    figures = measure.speed(task, model, batches, 0, evaluated)
    assert set(figures) == {"samples_per_s", "latency_ms_batch32", "latency_ms_batch1"}
    assert not measure.can_generate(model)


# ------------------------------------------------------------------------------ formats
def _answers(model, lm) -> list[dict]:
    return TASK.predict(model, lm["tokenizer"], lm["meta"], ["What is 2 plus 3?", "Say lamp."])


def test_an_int8_model_with_tied_embeddings_stores_them_once_and_generates(lm, tmp_path):
    model, tokenizer, meta = lm["model"], lm["tokenizer"], lm["meta"]
    qmodel = quantize_dynamic_int8(model, per_channel=True, keep_float=["lm_head"], embeddings=True)
    # The head stays float, so the table tied to it does too (int8 would store it twice).
    assert type(qmodel.lm_head) is torch.nn.Linear
    assert qmodel.lm_head.weight is qmodel.model.embed_tokens.weight
    folder = tmp_path / "int8"
    save_int8_artifact(qmodel, tokenizer, replace(meta, weights="int8"), folder)
    from safetensors import safe_open

    with safe_open(str(folder / INT8_WEIGHTS), framework="pt") as handle:
        keys, header = set(handle.keys()), handle.metadata()
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert json.loads(header["tied"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert (folder / "config" / "generation_config.json").is_file()

    loaded, tok, loaded_meta = load_model_artifact(folder)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    batch = TASK.collate([[1, 2, 3, 4], [5, 6]], None, 0)
    with torch.inference_mode():
        expected = qmodel(**TASK.model_inputs(batch, qmodel)).logits
        got = loaded(**TASK.model_inputs(batch, loaded)).logits
    assert torch.equal(expected, got)
    answers = _answers(loaded, {**lm, "tokenizer": tok, "meta": loaded_meta})
    assert answers == _answers(qmodel, lm)  # greedy: the loaded model is the one measured
    assert all(isinstance(a["text"], str) and a["completion_tokens"] >= 1 for a in answers)


def test_an_int8_model_without_float_layers_quantizes_head_and_table(lm, tmp_path):
    qmodel = quantize_dynamic_int8(lm["model"], per_channel=True, keep_float=[], embeddings=True)
    assert isinstance(qmodel.model.embed_tokens, Int8Embedding)
    folder = tmp_path / "int8"
    meta = replace(lm["meta"], weights="int8")
    save_int8_artifact(qmodel, lm["tokenizer"], meta, folder)
    loaded, _, _ = load_model_artifact(folder)
    assert isinstance(loaded.model.embed_tokens, Int8Embedding)
    assert _answers(loaded, lm) == _answers(qmodel, lm)


def test_a_gpu_wrapped_model_generates_through_its_wrapper(lm):
    """CudaModel (a gpu_weight_only artifact, loaded) answers on the inputs' device and
    generates; on this CPU machine it wraps a CPU model, the same code path."""
    wrapped = CudaModel(lm["model"])
    assert measure.can_generate(wrapped) and wrapped.config is lm["model"].config
    assert _answers(wrapped, lm) == _answers(lm["model"], lm)


def test_onnx_int8_is_refused_for_a_model_that_generates_before_anything_is_written(lm, tmp_path):
    from tests.unit.test_compress_formats import tiny_bert

    why = quantize.refusal("onnx_int8", lm["model"])
    assert why and "compress.method onnx_int8" in why and "dynamic_int8 or bf16" in why
    assert quantize.refusal("dynamic_int8", lm["model"]) is None
    assert quantize.refusal("onnx_int8", tiny_bert()) is None
    source = tmp_path / "source"
    save_model_artifact(lm["model"], lm["tokenizer"], lm["meta"], source)
    raw = {**lm["raw"], "compress": {"method": "onnx_int8"}}
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="onnx_int8 exports one forward pass"):
        quantize.run_compress(validate_experiment(raw), source, out, "no-run", log=print)
    assert not Path(out).exists()


@pytest.mark.gpu
def test_gpu_weight_only_int8_scores_and_generates_like_bf16(lm):
    """int8_weight_only as a gpu_weight_only artifact loads (torchao on the GPU): the
    evaluation moves its batches to the GPU, generation goes through the wrapper."""
    pytest.importorskip("torchao", reason="torchao is optional: GPU weight-only formats only")
    from lepton_ray.compress.modules import quantize_weight_only

    assert torch.cuda.is_available(), "no CUDA device: run the gpu tests on a GPU machine"
    import copy

    data = measure.evaluation_set(lm["cfg"], TASK, "validation", lm["tokenizer"], lm["meta"])

    def on_gpu():
        return copy.deepcopy(lm["model"]).to("cuda", torch.bfloat16)

    reference = measure.evaluate(TASK, CudaModel(on_gpu()), data, [])["scores"]["perplexity"]
    int8 = CudaModel(quantize_weight_only(on_gpu(), "int8_weight_only"))
    scores = measure.evaluate(TASK, int8, data, [])["scores"]
    assert abs(scores["perplexity"] - reference) / reference < 0.05
    figures = measure.speed(TASK, int8, data, measure.pad_id(lm["tokenizer"]))
    assert figures["tokens_per_s_batch1"] > 0 and figures["tokens_per_s_batch8"] > 0
    assert all(isinstance(a["text"], str) for a in _answers(int8, lm))
