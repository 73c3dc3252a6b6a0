"""``compress.prune`` on tiny random models: unstructured magnitude pruning reaches its
sparsity, removed heads shrink the attention and the model still runs, saves and loads back
at its smaller shapes, recovery keeps the pruned weights at zero, and validate refuses what
cannot run."""

from __future__ import annotations

import json

import pytest
import torch

from lepton_ray.artifacts import ModelMeta, load_tokenizer, save_model_artifact
from lepton_ray.compress import prune, quantize
from lepton_ray.compress.formats import (
    load_model_artifact,
    quantize_dynamic_int8,
    save_int8_artifact,
)
from lepton_ray.config import validate_experiment
from lepton_ray.errors import ConfigError
from lepton_ray.heads import PRUNED_HEADS, head_blocks, head_scores, load_pretrained, remove_heads
from lepton_ray.tasks import get_task
from tests.conftest import smoke_config
from tests.unit.test_compress_causal_lm import lm  # noqa: F401
from tests.unit.test_compress_formats import LABELS, TASK, tiny_bert
from tests.unit.test_compress_run import TEXTS, _config, _source, logged  # noqa: F401

BERT_TASK = get_task(TASK)
LM_TASK = get_task("causal_lm")


def tiny_llama(kv_heads: int = 2):
    """2 layers, 4 query heads of 16 dims, ``kv_heads`` key/value heads, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def _encoded(tokenizer):
    return tokenizer(TEXTS[:6], truncation=True, max_length=32, padding=True, return_tensors="pt")


# ------------------------------------------------------------------------ unstructured
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_global_magnitude_pruning_zeroes_the_smallest_weights_at_the_target(sparsity):
    model = tiny_bert()
    linears = prune.prune_targets(model, None)
    # The default targets: every Linear of the transformer layers, nothing outside them.
    assert linears and all(n.startswith("bert.encoder.layer.") for n in linears)
    assert len(linears) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    smallest = torch.cat([m.weight.detach().abs().flatten() for m in linears.values()])
    cut = smallest.sort().values[round(sparsity * smallest.numel()) - 1]
    head_before = model.classifier.weight.clone()
    embed_before = model.bert.embeddings.word_embeddings.weight.clone()

    prune.apply_masks(linears, prune.magnitude_masks(linears, sparsity))

    weights = torch.cat([m.weight.detach().flatten() for m in linears.values()])
    zeros = int((weights == 0).sum())
    assert abs(zeros - sparsity * weights.numel()) <= 1
    # Global: what survived is larger in magnitude than anything cut.
    assert weights[weights != 0].abs().min() >= cut
    assert torch.equal(model.classifier.weight, head_before)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, embed_before)
    figures = prune.sparsity_of(model, linears)
    assert figures["prune_sparsity"] == pytest.approx(sparsity, abs=1 / weights.numel())
    assert 0 < figures["prune_sparsity_all"] < figures["prune_sparsity"]


def test_targets_name_modules_and_an_unknown_one_lists_the_candidates():
    model = tiny_bert()
    assert list(prune.prune_targets(model, ["classifier"])) == ["classifier"]
    with pytest.raises(ConfigError, match="compress.prune.targets: 'clasifier'.*bert.encoder"):
        prune.prune_targets(model, ["clasifier"])


# ------------------------------------------------------------------------ heads
def test_removed_bert_heads_shrink_the_projections_and_the_model_still_runs(tokenizer):
    model = tiny_bert()
    encoded = _encoded(tokenizer)
    with torch.inference_mode():
        shape = model(**encoded).logits.shape
    params = sum(p.numel() for p in model.parameters())
    block = head_blocks(model)[0]
    scores = head_scores(block)
    lowest = int(scores.argmin())

    plan = prune.choose_heads(model, 1)
    assert plan[0] == [lowest]
    record = remove_heads(model, plan)

    attention = model.bert.encoder.layer[0].attention
    for linear in (attention.self.query, attention.self.key, attention.self.value):
        assert linear.weight.shape == (32, 64)  # 1 head of 32 dims left of 2
    assert attention.output.dense.weight.shape == (64, 32)
    assert sum(p.numel() for p in model.parameters()) < params
    assert model.config.pruned_heads == record == {"0": plan[0], "1": plan[1]}
    with torch.inference_mode():
        assert model(**encoded).logits.shape == shape


def test_a_head_pruned_bert_saves_and_loads_back_with_the_same_logits(tmp_path, tokenizer):
    model = tiny_bert()
    remove_heads(model, {0: [1], 1: [0]})
    encoded = _encoded(tokenizer)
    with torch.inference_mode():
        expected = model(**encoded).logits
    meta = ModelMeta(TASK, LABELS, "minilm", 32, weights="full")
    save_model_artifact(model, tokenizer, meta, tmp_path / "full")
    saved = json.loads((tmp_path / "full" / "model" / "config.json").read_text())
    assert saved[PRUNED_HEADS] == {"0": [1], "1": [0]}

    loaded, _, _ = load_model_artifact(tmp_path / "full")
    assert loaded.bert.encoder.layer[1].attention.self.query.weight.shape == (32, 64)
    with torch.inference_mode():
        assert torch.allclose(loaded(**encoded).logits, expected, atol=1e-6)

    # The int8 format rebuilds the structure from its config too.
    int8_meta = ModelMeta(TASK, LABELS, "minilm", 32, weights="int8")
    save_int8_artifact(quantize_dynamic_int8(model), tokenizer, int8_meta, tmp_path / "int8")
    int8, _, _ = load_model_artifact(tmp_path / "int8")
    with torch.inference_mode():
        logits = int8(**encoded).logits
    assert logits.shape == expected.shape
    assert torch.allclose(logits, expected, atol=0.05)


def test_a_second_pruning_records_heads_by_their_original_index():
    model = tiny_llama(kv_heads=4)  # no grouping: a unit is one query head
    remove_heads(model, {0: [1]})
    record = remove_heads(model, {0: [1]})  # now the head that was index 2
    assert record["0"] == [1, 2]
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_llama_heads_go_by_key_value_group_and_the_model_still_generates(tmp_path, kv_heads):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(kv_heads)
    ids = torch.randint(0, 128, (2, 12))
    with torch.inference_mode():
        shape = model(input_ids=ids).logits.shape
    group = 4 // kv_heads
    if group > 1:
        with pytest.raises(ConfigError, match="multiple of 2"):
            prune.choose_heads(model, 1)
    remove_heads(model, prune.choose_heads(model, 2))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64)  # 2 of 4 query heads left
    assert attn.k_proj.weight.shape == (16 * (kv_heads - 2 // group), 64)
    assert attn.o_proj.weight.shape == (64, 32)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        assert logits.shape == shape
        out = model.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)

    model.save_pretrained(tmp_path / "lm")
    loaded = load_pretrained(AutoModelForCausalLM, tmp_path / "lm").eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    with torch.inference_mode():
        assert torch.allclose(loaded(input_ids=ids).logits, logits, atol=1e-5)


def test_removing_every_head_of_a_layer_is_refused():
    with pytest.raises(ConfigError, match="every head of layer 0"):
        prune.choose_heads(tiny_bert(), 2)
    with pytest.raises(ValueError, match="every head of layer 0"):
        remove_heads(tiny_bert(), {0: [0, 1]})


# ------------------------------------------------------------------------ recovery
def test_recovery_changes_surviving_weights_and_keeps_pruned_ones_zero(tokenizer):
    model = tiny_bert()
    linears = prune.prune_targets(model, None)
    masks = prune.magnitude_masks(linears, 0.5)
    prune.apply_masks(linears, masks)
    before = {n: m.weight.detach().clone() for n, m in linears.items()}
    encoded = _encoded(tokenizer)
    batch = {**encoded, "labels": torch.tensor([0, 1, 1, 0, 1, 0])}

    losses = prune.recover(model, BERT_TASK, [batch], 8, 1e-2, 0.01, 1.0, linears, masks)

    assert len(losses) == 8 and losses[-1] < losses[0]
    for name, linear in linears.items():
        kept = masks[name]
        assert torch.all(linear.weight[~kept] == 0), name
        assert not torch.equal(linear.weight[kept], before[name][kept]), name
    assert not model.training


def test_recovery_works_through_the_causal_lm_loss():
    model = tiny_llama()
    linears = prune.prune_targets(model, None)
    assert all(n.startswith("model.layers.") for n in linears)
    assert "lm_head" not in linears
    masks = prune.magnitude_masks(linears, 0.5)
    prune.apply_masks(linears, masks)
    ids = torch.randint(0, 128, (4, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    losses = prune.recover(model, LM_TASK, [batch], 6, 1e-2, 0.0, None, linears, masks)
    assert losses[-1] < losses[0]
    assert prune.sparsity_of(model, linears)["prune_sparsity"] == pytest.approx(0.5, abs=1e-4)


# ------------------------------------------------------------------------ the compress stage
def test_run_compress_prunes_recovers_gates_and_writes_a_smaller_float_model(
    tmp_path,
    tokenizer,
    logged,  # noqa: F811
    monkeypatch,
):
    params: dict = {}
    monkeypatch.setattr(prune, "log_prune_params", lambda uri, run, d: params.update(d))
    prune_cfg = {"sparsity": 0.5, "heads": 1, "recovery_steps": 2}
    cfg = _config(tmp_path, tokenizer, method="fp32", prune=prune_cfg, max_drop=100.0)
    lines: list[str] = []
    result = quantize.run_compress(
        cfg, _source(tmp_path, tokenizer), tmp_path / "out", "r", log=lines.append
    )

    assert result.accepted and result.folder is not None
    m = result.metrics
    for key in ("val_accuracy_fp32", "val_accuracy_pruned", "val_accuracy_recovered"):
        assert 0.0 <= m[key] <= 1.0
    assert m["prune_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert m["prune_sparsity_recovered"] == pytest.approx(0.5, abs=1e-4)
    assert m["prune_heads_removed"] == 2
    assert m["size_mb_compressed"] < m["size_mb_fp32"]  # heads removed: really smaller
    assert "latency_ms_batch1_compressed" in m
    assert any("no smaller file, no faster dense kernel" in line for line in lines)
    assert logged["metrics"][0]["prune_sparsity"] == m["prune_sparsity"]
    assert params["sparsity_target"] == 0.5 and params["recovery_steps"] == 2

    model, _, meta = load_model_artifact(result.folder)
    assert meta.weights == "full" and meta.extra["quantization"] == "fp32"
    assert meta.extra["compression"]["pruning"]["removed_heads"].keys() == {"0", "1"}
    layer = model.bert.encoder.layer[0]
    assert layer.attention.self.query.weight.shape == (32, 64)
    targets = prune.prune_targets(model, None)
    assert prune.sparsity_of(model, targets)["prune_sparsity"] == pytest.approx(0.5, abs=1e-4)


# ------------------------------------------------------------------------ validate
def _validate(tmp_path, model=None, **prune_cfg):
    raw = smoke_config(tmp_path, tmp_path / "x.csv", compress={"prune": prune_cfg})
    (tmp_path / "x.csv").write_text("review,sentiment\na,b\n")
    if model:
        raw["model"] = model
    return validate_experiment(raw)


@pytest.mark.parametrize("sparsity", [1.0, -0.1])
def test_validate_refuses_a_sparsity_outside_zero_to_one(tmp_path, sparsity):
    with pytest.raises(ConfigError, match=r"compress\.prune\.sparsity"):
        _validate(tmp_path, sparsity=sparsity)
    assert _validate(tmp_path, sparsity=0.99).compress.prune.sparsity == 0.99


def test_validate_refuses_removing_every_head_and_an_unsupported_model_type(tmp_path):
    with pytest.raises(ConfigError, match=r"compress\.prune\.heads 2 would remove every"):
        _validate(tmp_path, heads=2)  # the smoke BERT has 2 heads per layer
    assert _validate(tmp_path, heads=1).compress.prune.heads == 1
    other = tmp_path / "distil"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "distilbert", "n_heads": 12}))
    with pytest.raises(ConfigError, match=r"compress\.prune\.heads: model\.name .* distilbert"):
        _validate(tmp_path, model={"name": str(other)}, heads=1)


def test_validate_refuses_pruning_that_would_never_run(tmp_path):
    with pytest.raises(ConfigError, match="compress.prune sets neither"):
        _validate(tmp_path)
    raw = smoke_config(tmp_path, tmp_path / "x.csv", compress={"method": "fp32"})
    with pytest.raises(ConfigError, match="compress.method fp32"):
        validate_experiment(raw)


def test_a_pruned_causal_lm_is_measured_in_perplexity_quantized_and_generates(
    lm,  # noqa: F811
    tmp_path,
):
    """Heads (by key/value group) and unstructured pruning of the tiny Llama, one recovery
    step, then dynamic int8: perplexity before, after pruning and after recovery; the int8
    artifact rebuilds the smaller attention from its config and generates."""
    source = tmp_path / "source"
    save_model_artifact(lm["model"], lm["tokenizer"], lm["meta"], source)
    prune_cfg = {"sparsity": 0.3, "heads": 2, "recovery_steps": 1}
    compress = {"method": "dynamic_int8", "prune": prune_cfg, "max_ppl_increase": 100.0}
    cfg = validate_experiment({**lm["raw"], "compress": compress})
    result = quantize.compress_and_measure(cfg, source, tmp_path / "out", splits=("validation",))

    m = result.metrics
    for tag in ("fp32", "pruned", "recovered", "compressed"):
        assert 1.0 < m[f"val_perplexity_{tag}"] < float("inf"), tag
    assert m["prune_sparsity"] == pytest.approx(0.3, abs=1e-4)
    assert m["params_pruned"] < m["params_fp32"]
    assert "tokens_per_s_batch1_compressed" in m
    loaded, tok, meta = load_model_artifact(result.folder)
    assert meta.extra["compression"]["pruning"]["removed_heads"].keys() == {"0", "1"}
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert q_proj.weight().shape[0] == 2 * 64  # int8 Linear: 2 of 4 query heads of 64 dims
    answers = LM_TASK.predict(loaded, tok, meta, ["What is 2 plus 3?"])
    assert isinstance(answers[0]["text"], str) and answers[0]["completion_tokens"] >= 1
