"""`lepton-ray compress` of a causal language model end to end: preprocess and train a
tiny Llama (LoRA) on Ray, then compress the registered version with dynamic int8 and bf16
(merged adapter; perplexity, generation scores, size and tokens/s before and after), load
each registered compression and generate from it; a compression whose perplexity rises
more than compress.max_ppl_increase is refused and registers nothing."""

from __future__ import annotations

import pytest

from lepton_ray.compress.formats import load_model_artifact
from lepton_ray.config import validate_experiment
from lepton_ray.data.sample import write_chats_jsonl
from lepton_ray.tasks import get_task
from tests.conftest import TINY_LLAMA, smoke_config

pytestmark = pytest.mark.slow

NAME = "lmcompress"
PROMPTS = ["What is 2 plus 3?", "Say lamp."]


def lm_raw(tmp, compress: dict | None = None, real: bool = False) -> dict:
    source = tmp / "chats.jsonl"
    if not source.exists():
        write_chats_jsonl(source, n=160, seed=3)
    raw = smoke_config(tmp, source, name=NAME, compress=compress or {})
    raw["task"] = "causal_lm"
    raw["data"] = {
        "path": str(source),
        "max_length": 64,
        "split": {"validation": 0.15, "test": 0.1},
        "chat": {"format": "messages"},
    }
    raw["model"] = (
        {"name": "smollm2"}
        if real
        else {"name": "smollm2", "random_init": True, "config_overrides": TINY_LLAMA}
    )
    raw["peft"] = {
        "method": "lora",
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    }
    raw["train"] = {
        "epochs": 1,
        "batch_size": 8,
        "lr": 5e-3,
        "max_steps_per_epoch": 2 if real else 4,
        "generation": {"samples": 2 if real else 3, "max_new_tokens": 6},
    }
    if real:
        raw["train"]["lr"] = 1e-4
    raw["tune"] = {"enabled": False, "metric": "val_perplexity"}
    raw["registry"] = {"promotion": "manual"}  # v1 stays the champion: each run compresses it
    return raw


def _train(tmp, real: bool = False):
    from lepton_ray.pipeline import run_preprocess_stage, run_train_stage

    cfg = validate_experiment(lm_raw(tmp, real=real))
    run_preprocess_stage(cfg, log=lambda _: None)
    best = run_train_stage(cfg, log=lambda _: None)
    assert str(best["version"]) == "1"
    return tmp


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session, smollm2_path):
    """The tiny random Llama, LoRA-tuned for 4 steps."""
    return _train(tmp_path_factory.mktemp("compress_lm"))


@pytest.fixture(scope="module")
def trained_real(tmp_path_factory, ray_session, smollm2_path):
    """The pretrained SmolLM2-135M-Instruct, LoRA-tuned for 2 steps: a model whose
    predictions are sharp, so a lossy int8 recipe raises its perplexity. (The tiny random
    model sits at a perplexity near its vocabulary's size, where an int8 rounding moves it
    by 1e-4 either way, depending on the CPU's kernels.)"""
    return _train(tmp_path_factory.mktemp("compress_lm_real"), real=True)


def _compress(tmp, real: bool = False, **compress):
    from lepton_ray.pipeline import run_compress_stage

    cfg = validate_experiment(lm_raw(tmp, compress, real=real))
    lines: list[str] = []
    result = run_compress_stage(cfg, model_uri=f"models:/{NAME}/1", log=lines.append)
    return cfg, result, lines


def _generates(cfg, version: str, weights: str) -> None:
    """The registered compression loads as Serve loads it and answers with text."""
    from lepton_ray.tracking.mlflow import download_model

    folder = download_model(cfg.tracking.tracking_uri, f"models:/{NAME}/{version}")
    model, tokenizer, meta = load_model_artifact(folder)
    assert meta.weights == weights and meta.extra["chat"]["stop_token_ids"]
    answers = get_task(meta.task).predict(model, tokenizer, meta, PROMPTS)
    assert len(answers) == len(PROMPTS)
    for answer in answers:
        assert isinstance(answer["text"], str) and answer["completion_tokens"] >= 1
        assert answer["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(("method", "weights"), [("dynamic_int8", "int8"), ("bf16", "bf16")])
def test_a_trained_causal_lm_compresses_reports_and_generates(trained, method, weights):
    cfg, result, lines = _compress(trained, method=method)
    assert result["accepted"], result["reason"]
    assert result["method"] == method and result["compressed_version"] is not None
    m = result["metrics"]
    for split in ("val", "test"):
        before, after = m[f"{split}_perplexity_fp32"], m[f"{split}_perplexity_compressed"]
        assert 1.0 < before < float("inf") and 1.0 < after < float("inf")
        assert m[f"{split}_perplexity_increase"] == pytest.approx((after - before) / before)
        assert abs(m[f"{split}_perplexity_increase"]) <= cfg.compress.max_ppl_increase
    for score in ("rouge_l", "exact_match", "token_accuracy"):  # generation scores too
        assert 0.0 <= m[f"val_{score}_fp32"] <= 1.0 and 0.0 <= m[f"val_{score}_compressed"] <= 1.0
    assert "val_prediction_agreement" in m  # same greedy answers before and after
    assert m["size_mb_compressed"] < m["size_mb_fp32"]
    for batch in (1, 8):
        for tag in ("fp32", "compressed"):
            assert m[f"tokens_per_s_batch{batch}_{tag}"] > 0
    summary = next(line for line in lines if "MB ->" in line)
    assert "tokens/s at batch 1" in summary and "tokens/s at batch 8" in summary
    assert "val perplexity" in summary
    assert any("rouge l" in line for line in lines if line.startswith("[compress] validation"))
    assert "perplexity increase" in result["reason"]
    _generates(cfg, str(result["compressed_version"]), weights)


def test_a_perplexity_rise_over_max_ppl_increase_is_refused_and_registers_nothing(trained_real):
    """int8 of every layer of the pretrained model (the head and the embeddings too, one
    scale per matrix): its perplexity rises, so with an absurdly low limit `lepton-ray
    compress` refuses it and the registry keeps v1 alone."""
    from mlflow.tracking import MlflowClient

    from lepton_ray.compress.quantize import judge

    strict = {"method": "dynamic_int8", "keep_float": [], "per_channel": False}
    cfg, staged, lines = _compress(trained_real, real=True, **strict, max_ppl_increase=1e-9)
    rise = staged["metrics"]["val_perplexity_increase"]
    assert rise > 1e-9, "this int8 recipe must make the perplexity worse for the test to hold"
    assert not staged["accepted"] and staged["compressed_version"] is None
    assert staged["metrics"]["accepted"] == 0.0
    assert "more than compress.max_ppl_increase 1e-09" in staged["reason"]
    assert any(line.startswith("[compress] refused:") for line in lines)
    versions = MlflowClient(cfg.tracking.tracking_uri).search_model_versions(f"name='{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    # The same measurements under a limit above the rise pass: the limit refused it.
    assert judge(staged["metrics"], "dynamic_int8", cfg.tune.metric, 1.0, "perplexity", 2 * rise)[0]
