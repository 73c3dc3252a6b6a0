"""Every ``peft.method`` on tiny random models of both tasks: the trainable weights are the
method's, LoRA+ trains the B matrices faster, AdaLoRA's budget shrinks inside the real loop
and its orthogonality term reaches the loss, each adapter saved as an artifact loads on its
base with the same logits (merged where the method merges), and ``validate`` refuses the
combinations that cannot work, naming both keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lepton_ray.artifacts import (
    ModelMeta,
    build_model,
    load_float_artifact,
    load_tokenizer,
    merges,
    save_model_artifact,
    unmerged_refusal,
)
from lepton_ray.cli import app
from lepton_ray.config import ModelConfig, PeftSection, validate_experiment
from lepton_ray.data.sample import write_chats_jsonl
from lepton_ray.errors import ConfigError
from lepton_ray.tasks import get_task
from lepton_ray.tasks.base import encode_texts
from lepton_ray.train.batching import TokenRows
from lepton_ray.train.loop import build_optimizer
from lepton_ray.train.peft import apply_peft, parameter_counts
from lepton_ray.train.peft_methods import AdaLoraBudget, adalora_ranks, orthogonality_penalty
from lepton_ray.train.recipe import setup_recipe, train_recipe
from tests.conftest import TINY_BERT, TINY_LLAMA, smoke_config, write_yaml

runner = CliRunner()
CLS, LM = "sequence_classification", "causal_lm"
H, LAYERS, HEAD = 64, 2, 64 * 2 + 2  # tiny BERT: hidden, layers, classifier weights


def _bert():
    cfg = ModelConfig(name="minilm", random_init=True, config_overrides=TINY_BERT)
    return build_model(cfg, CLS, ["negative", "positive"])


def _llama():
    cfg = ModelConfig(name="smollm2", random_init=True, config_overrides=TINY_LLAMA)
    return build_model(cfg, LM, [])


def _ids(rows=2, length=9):
    torch.manual_seed(3)
    ids = torch.randint(5, 500, (rows, length))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _trainable(peft: dict, task=CLS, model=None):
    model = model if model is not None else (_bert() if task == CLS else _llama())
    wrapped = apply_peft(model, PeftSection(**peft), task, total_steps=20)
    return wrapped, parameter_counts(wrapped)


# ------------------------------------------------------------------ trainable weights
@pytest.mark.parametrize(
    ("peft", "expected"),
    [
        # r x in + out x r per adapted layer (query, value in each layer), plus the head
        ({"method": "lora", "lora": {"r": 4}}, 2 * LAYERS * (4 * H + H * 4) + HEAD),
        # DoRA: a magnitude per output row of each adapted layer on top
        (
            {"method": "lora", "lora": {"r": 4, "use_dora": True}},
            2 * LAYERS * (4 * H + H * 4 + H) + HEAD,
        ),
        # AdaLoRA: P (r x in), Q (out x r) and the r singular values, at init_r
        (
            {"method": "adalora", "adalora": {"init_r": 4, "target_r": 2}},
            2 * LAYERS * (4 * H + H * 4 + 4) + HEAD,
        ),
        # IA3 (auto for BERT): key and value scale their outputs (64); the two output.dense
        # layers are feed-forward, scaled on their inputs (64 and 128)
        ({"method": "ia3"}, LAYERS * (H + H + H + 2 * H) + HEAD),
        ({"method": "prompt", "prompt": {"num_virtual_tokens": 5}}, 5 * H + HEAD),
        ({"method": "none"}, None),
    ],
)
def test_the_trainable_weights_are_the_methods(peft, expected):
    model, counts = _trainable(peft)
    if expected is None:  # full fine-tuning: every weight
        expected = counts["params_total"]
    assert counts["params_trainable"] == expected
    assert counts["params_trainable_share"] == pytest.approx(expected / counts["params_total"])
    assert 0 < counts["params_trainable_share"] <= 1


def test_prefix_on_a_causal_lm_trains_keys_and_values_of_every_layer():
    model, counts = _trainable({"method": "prefix", "prefix": {"num_virtual_tokens": 6}}, LM)
    kv = TINY_LLAMA["num_key_value_heads"] * 64  # SmolLM2's head_dim is 64
    assert counts["params_trainable"] == 6 * TINY_LLAMA["num_hidden_layers"] * 2 * kv
    inputs = _ids()
    out = model(**inputs).logits
    assert out.shape[:2] == inputs["input_ids"].shape  # aligned with the input ids
    with model.disable_adapter():
        plain = model(**inputs).logits
    assert not torch.allclose(out, plain)  # the prefix changes what the model computes


def test_rslora_scales_by_the_square_root_of_the_rank():
    plain, _ = _trainable({"method": "lora", "lora": {"r": 16, "lora_alpha": 8}})
    rs, _ = _trainable({"method": "lora", "lora": {"r": 16, "lora_alpha": 8, "use_rslora": True}})
    layer = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert plain.get_submodule(layer).scaling["default"] == pytest.approx(8 / 16)
    assert rs.get_submodule(layer).scaling["default"] == pytest.approx(8 / math.sqrt(16))


def test_loraplus_gives_the_b_matrices_their_own_larger_learning_rate():
    model, _ = _trainable({"method": "lora", "lora": {"r": 4, "loraplus_lr_ratio": 16}})
    optimizer = build_optimizer(model, 1e-3, 0.01, loraplus_lr_ratio=16)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    b = [n for n, p in names.items() if p.requires_grad and ".lora_B." in n]
    rest = [n for n, p in names.items() if p.requires_grad and ".lora_B." not in n]
    assert b and rest
    assert all(by_param[id(names[n])]["lr"] == pytest.approx(16e-3) for n in b)
    assert all(by_param[id(names[n])]["lr"] == pytest.approx(1e-3) for n in rest)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(b) + len(rest)
    plain = build_optimizer(model, 1e-3, 0.01)
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


# ------------------------------------------------------------------ AdaLoRA in the loop
def _rows(n: int, targets) -> TokenRows:
    rng = np.random.default_rng(0)
    lengths = rng.integers(6, 12, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(5, 500, int(offsets[-1]))
    return TokenRows(ids=ids, offsets=offsets, targets=targets(lengths, offsets))


def test_adalora_budget_shrinks_inside_the_training_loop(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("review,sentiment\na,positive\n")
    raw = smoke_config(
        tmp_path,
        data,
        peft={
            "method": "adalora",
            "adalora": {
                "init_r": 4,
                "target_r": 1,
                "tinit": 2,
                "tfinal": 2,
                "deltaT": 1,
                "lora_alpha": 8,
                "orth_reg_weight": 0.5,
                "target_modules": ["query", "value"],
            },
        },
        train={"epochs": 2, "batch_size": 4, "lr": 1e-2, "precision": "fp32"},
        scaling={"num_workers": 1},
    )
    cfg = validate_experiment(raw)
    rows = _rows(24, lambda lengths, _: np.arange(len(lengths)) % 2)
    recipe = setup_recipe(cfg, {"labels": ["negative", "positive"]}, len(rows), torch.device("cpu"))
    budget = [t for t in recipe.techniques.parts if isinstance(t, AdaLoraBudget)]
    assert len(budget) == 1 and budget[0].total_step == 12  # 6 steps x 2 epochs, the real run
    start = adalora_ranks(recipe.model)
    assert len(start) == 4 and sum(start.values()) == 16  # 4 layers at init_r
    reports = []

    def report(metrics, folder):
        saved = load_float_artifact(folder, merge=True)[0]  # AdaLoRA merges for export
        inputs = _ids()
        recipe.model.eval()
        with torch.no_grad():
            live = recipe.model(**inputs).logits
            torch.testing.assert_close(saved(**inputs).logits, live, atol=1e-5, rtol=1e-4)
        recipe.model.train()
        reports.append(metrics)

    train_recipe(recipe, rows, rows, torch.device("cpu"), 0, 1, report, log=lambda _: None)
    end = adalora_ranks(recipe.model)
    assert sum(end.values()) <= 4 < sum(start.values())  # the budget: target_r x 4 layers
    assert end != start
    for name, p in recipe.model.named_parameters():  # the pruned singular values are zero
        if name in end:
            assert int((p != 0).sum()) <= end[name]
    pattern = recipe.model.peft_config["default"].rank_pattern
    assert pattern and sum(sum(v) for v in pattern.values()) == sum(end.values())
    assert len(reports) == 2 and all(r["adalora_orth_reg"] > 0 for r in reports)


def test_adalora_orthogonality_term_reaches_the_loss_of_both_tasks():
    for task, model in ((LM, _llama()), (CLS, _bert())):
        wrapped = apply_peft(
            model,
            PeftSection(
                method="adalora", adalora={"orth_reg_weight": 0.3, "target_modules": "attention"}
            ),
            task,
            total_steps=20,
        )
        budget = AdaLoraBudget(wrapped)
        assert budget.weight == 0.3
        # peft's forward would add it to outputs.loss for a classifier only; it must not
        # count twice
        assert wrapped.peft_config["default"].orth_reg_weight == 0.0
        inputs = _ids()
        if task == CLS:
            inputs["labels"] = torch.tensor([0, 1])
        out = wrapped(**inputs)
        if task == CLS:
            plain = torch.nn.functional.cross_entropy(out.logits, inputs["labels"])
            torch.testing.assert_close(out.loss, plain)
        base = out.logits.float().mean()
        total = budget.loss(wrapped, inputs, inputs, out, base)
        penalty = orthogonality_penalty(wrapped)
        assert float(penalty) > 0
        torch.testing.assert_close(total, base + 0.3 * penalty)
        total.backward()
        grads = [p.grad for n, p in wrapped.named_parameters() if ".lora_A." in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_adalora_schedule_must_leave_steps_to_shrink_in():
    with pytest.raises(ConfigError, match=r"peft.adalora.tinit 5 \+ peft.adalora.tfinal 5"):
        apply_peft(
            _bert(), PeftSection(method="adalora", adalora={"tinit": 5, "tfinal": 5}), CLS, 8
        )


# ------------------------------------------------------------------ artifacts
ARTIFACT_CASES = [
    (CLS, {"method": "lora", "lora": {"r": 4}}),
    (CLS, {"method": "lora", "lora": {"r": 4, "use_dora": True, "use_rslora": True}}),
    (CLS, {"method": "adalora", "adalora": {"init_r": 4, "target_r": 2}}),
    (CLS, {"method": "ia3"}),
    (CLS, {"method": "prompt", "prompt": {"num_virtual_tokens": 4}}),
    (LM, {"method": "lora", "lora": {"r": 4, "target_modules": "all-linear"}}),
    (LM, {"method": "ia3"}),
    (LM, {"method": "prefix", "prefix": {"num_virtual_tokens": 4}}),
]


@pytest.mark.parametrize(("task", "peft"), ARTIFACT_CASES)
def test_a_saved_adapter_loads_on_its_base_and_merges_where_it_can(tmp_path, task, peft):
    base = _bert() if task == CLS else _llama()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    model = apply_peft(base, PeftSection(**peft), task, total_steps=20)
    torch.manual_seed(5)
    with torch.no_grad():  # trained-looking adapter weights (LoRA's B starts at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    inputs = _ids()
    with torch.no_grad():
        live = model(**inputs).logits
    meta = ModelMeta(
        task=task,
        labels=["negative", "positive"] if task == CLS else [],
        base_model="./base",
        max_length=32,
        weights="adapter",
        peft_method=peft["method"],
    )
    save_model_artifact(
        model, load_tokenizer("minilm" if task == CLS else "smollm2"), meta, tmp_path
    )
    unmerged, _, _ = load_float_artifact(tmp_path, merge=False)
    merged, tokenizer, loaded_meta = load_float_artifact(tmp_path, merge=True)
    with torch.no_grad():
        torch.testing.assert_close(unmerged(**inputs).logits, live, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged(**inputs).logits, live, atol=1e-4, rtol=1e-4)
    from peft import PeftModel

    if task == CLS:  # what predict, serve and the pyfunc run (the tokenizer's own inputs)
        answers = get_task(task).predict(merged, tokenizer, loaded_meta, ["a fine lamp", "no"])
        assert [a["label"] for a in answers] == [
            ["negative", "positive"][i] for i in live_labels(unmerged, tokenizer, loaded_meta)
        ]
    if merges(loaded_meta):
        assert not isinstance(merged, PeftModel)  # a plain transformers model for export
        assert unmerged_refusal(loaded_meta, "compress") is None
    else:
        assert isinstance(merged, PeftModel)
        why = unmerged_refusal(loaded_meta, "compress")
        assert f"peft.method={peft['method']}" in why and "cannot be merged" in why


def live_labels(model, tokenizer, meta) -> list[int]:
    encoded, _ = encode_texts(tokenizer, meta, ["a fine lamp", "no"])
    with torch.no_grad():
        return model(**encoded).logits.argmax(-1).tolist()


# ------------------------------------------------------------------ config and validate
def test_a_run_logs_only_the_section_its_method_reads():
    assert PeftSection(method="ia3").unused_keys() == {
        "peft.lora",
        "peft.adalora",
        "peft.prefix",
        "peft.prompt",
    }
    assert "peft.lora" not in PeftSection(method="lora").unused_keys()
    assert len(PeftSection(method="none").unused_keys()) == 5


def _cls_config(tmp_path, **sections) -> str:
    source = tmp_path / "d.csv"
    source.write_text("review,sentiment\na,positive\nb,negative\n")
    raw = smoke_config(tmp_path, source, name="peft", **sections)
    return str(write_yaml(tmp_path / "c.yaml", raw))


def _lm_config(tmp_path, peft, serve: bool = False, **data) -> str:
    source = write_chats_jsonl(tmp_path / "chats.jsonl", n=10)
    raw = smoke_config(tmp_path, source, name="peft")
    raw["task"] = "causal_lm"
    raw["data"] = {"path": str(source), "max_length": 64, "chat": {"format": "messages"}, **data}
    raw["model"] = {"name": "smollm2"}
    raw["tune"] = {"enabled": False, "metric": "val_perplexity"}
    raw["compress"] = {"enabled": False}
    raw["serve"] = {"enabled": serve}
    raw["peft"] = peft
    return str(write_yaml(tmp_path / "c.yaml", raw))


def _one_line_refusal(config: str, *names: str) -> None:
    result = runner.invoke(app, ["validate", config])
    assert result.exit_code == 2, result.output
    for name in names:
        assert name in result.output, result.output


def test_validate_refuses_prefix_tuning_on_a_bert_classifier(tmp_path):
    config = _cls_config(tmp_path, peft={"method": "prefix"}, compress={"enabled": False})
    _one_line_refusal(config, "peft.method=prefix", "model.name=minilm")


def test_validate_refuses_what_virtual_tokens_break(tmp_path, smollm2_path):
    _one_line_refusal(
        _lm_config(tmp_path, {"method": "prompt"}), "peft.method=prompt", "task=causal_lm"
    )
    _one_line_refusal(
        _lm_config(tmp_path, {"method": "prefix"}, packing=True),
        "peft.method=prefix",
        "data.packing=true",
    )
    _one_line_refusal(
        _lm_config(tmp_path, {"method": "prefix"}, serve=True),
        "peft.method=prefix",
        "serve.enabled=true",
    )
    compressed = _cls_config(tmp_path, peft={"method": "prompt"})
    _one_line_refusal(compressed, "peft.method=prompt", "compress.enabled=true")
    ok = runner.invoke(app, ["validate", _lm_config(tmp_path, {"method": "prefix"})])
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize(
    ("peft", "listed"),
    [
        (
            {"method": "adalora", "adalora": {"target_modules": ["qkv"]}},
            "peft.adalora.target_modules",
        ),
        ({"method": "ia3", "ia3": {"target_modules": ["qkv"]}}, "peft.ia3.target_modules"),
        (
            {"method": "ia3", "ia3": {"target_modules": ["key"], "feedforward_modules": ["dense"]}},
            "peft.ia3.feedforward_modules",
        ),
    ],
)
def test_targets_of_every_method_are_resolved_against_the_model(tmp_path, peft, listed):
    result = runner.invoke(app, ["validate", _cls_config(tmp_path, peft=peft)])
    assert result.exit_code == 2 and listed in result.output, result.output
    assert "'key'" in result.output  # the candidates are listed


SWEEP = {
    "peft.method": {"type": "choice", "values": ["lora", "ia3"]},
    "peft.lora.r": {"type": "int", "low": 2, "high": 8, "when": {"peft.method": "lora"}},
    "peft.lora.use_dora": {
        "type": "choice",
        "values": [True, False],
        "when": {"peft.method": "lora"},
    },
}


def test_a_sweep_over_methods_with_their_own_parameters_validates(tmp_path):
    tune = {"enabled": True, "num_samples": 4, "space": SWEEP}
    result = runner.invoke(app, ["validate", _cls_config(tmp_path, tune=tune)])
    assert result.exit_code == 0, result.output
    # A searched method the model cannot run is refused before any trial starts.
    space = {**SWEEP, "peft.method": {"type": "choice", "values": ["lora", "prefix"]}}
    bad = _cls_config(tmp_path, tune={**tune, "space": space}, compress={"enabled": False})
    _one_line_refusal(bad, "peft.method=prefix", "model.name=minilm")
