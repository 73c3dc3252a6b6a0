"""`lepton-ray validate` resolves ``peft.lora.target_modules`` against the model's layers,
built on the meta device from its config.json: a target that matches nothing is one line
and exit 2 before any stage runs, for either task."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lepton_ray.cli import app
from lepton_ray.data.sample import write_chats_jsonl
from tests.conftest import smoke_config, write_yaml

runner = CliRunner()


def _config(tmp_path, task: str, targets) -> str:
    if task == "causal_lm":
        source = write_chats_jsonl(tmp_path / "chats.jsonl", n=10)
        raw = smoke_config(tmp_path, source, name="targets")
        raw["task"] = "causal_lm"
        raw["data"] = {"path": str(source), "max_length": 64, "chat": {"format": "messages"}}
        raw["model"] = {"name": "smollm2"}
        raw["tune"] = {"enabled": False, "metric": "val_perplexity"}
    else:
        source = tmp_path / "d.csv"
        source.write_text("review,sentiment\na,positive\nb,negative\n")
        raw = smoke_config(tmp_path, source, name="targets")
    raw["peft"] = {"method": "lora", "lora": {"r": 4, "lora_alpha": 8, "target_modules": targets}}
    return str(write_yaml(tmp_path / "c.yaml", raw))


@pytest.mark.parametrize(
    ("task", "bad", "good", "listed"),
    [
        ("causal_lm", ["q_proj", "qkv_proj"], ["q_proj", "v_proj"], "'k_proj', 'lm_head'"),
        ("sequence_classification", ["query", "qkv"], ["query", "value"], "'key', 'query'"),
    ],
)
def test_a_target_that_names_no_layer_fails_validate(
    tmp_path, smollm2_path, task, bad, good, listed
):
    result = runner.invoke(app, ["validate", _config(tmp_path, task, bad)])
    assert result.exit_code == 2, result.output
    assert "peft.lora.target_modules: ['qkv" in result.output and listed in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    ok = runner.invoke(app, ["validate", _config(tmp_path, task, good)])
    assert ok.exit_code == 0 and ok.output.startswith("ok:"), ok.output


def test_presets_resolve_at_validate(tmp_path, smollm2_path):
    for preset in ("attention", "all-linear"):
        result = runner.invoke(app, ["validate", _config(tmp_path, "causal_lm", preset)])
        assert result.exit_code == 0, result.output
