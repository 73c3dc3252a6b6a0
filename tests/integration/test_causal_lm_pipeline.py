"""A causal language model through the stages, from the CLI: preprocess (chat template,
masks, prompt-keyed split, report), training on Ray (DDP with packing; FSDP2), MLflow
(perplexity, generations table), the registry's pyfunc (loaded by MLflow alone) and the
perplexity gate."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from lepton_ray.cli import app
from lepton_ray.data.sample import write_chats_jsonl
from tests.conftest import TINY_LLAMA, smoke_config, write_yaml

pytestmark = pytest.mark.slow
runner = CliRunner()


def lm_config(tmp, source, name: str, data=None, train=None) -> dict:
    raw = smoke_config(tmp, source, name=name)
    raw["task"] = "causal_lm"
    raw["data"] = {
        "path": str(source),
        "max_length": 96,
        "split": {"validation": 0.15, "test": 0.1},
        "chat": {"format": "messages"},
        **(data or {}),
    }
    raw["model"] = {"name": "smollm2", "random_init": True, "config_overrides": TINY_LLAMA}
    raw["peft"] = {
        "method": "lora",
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    }
    raw["train"] = {
        "epochs": 2,
        "batch_size": 8,
        "lr": 5e-3,
        "max_steps_per_epoch": 6,
        "generation": {"samples": 3, "max_new_tokens": 6},
        **(train or {}),
    }
    raw["tune"] = {"enabled": False, "metric": "val_perplexity"}
    return raw


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_session, smollm2_path):
    tmp = tmp_path_factory.mktemp("causal_lm")
    data = write_chats_jsonl(tmp / "chats.jsonl", n=240, seed=3)
    raw = lm_config(tmp, data, name="chatlm", data={"packing": True})
    path = write_yaml(tmp / "chatlm.yaml", raw)
    uri = raw["tracking"]["tracking_uri"]
    return {"tmp": tmp, "path": path, "raw": raw, "client": MlflowClient(uri, registry_uri=uri)}


def test_preprocess_keys_splits_by_prompt_and_reports_lengths(setup):
    result = runner.invoke(app, ["preprocess", str(setup["path"])])
    assert result.exit_code == 0, result.output
    folder = setup["tmp"] / "storage" / "chatlm" / "data"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["labels"] == []
    assert manifest["rows_read"] == manifest["kept"] + sum(manifest["dropped"].values())
    assert manifest["prompt_lengths"]["counts"] and manifest["response_lengths"]["counts"]
    packing = manifest["packing"]
    assert packing["enabled"] is True
    assert packing["real_share_packed"] > packing["real_share_unpacked"]
    train = pq.read_table(folder / "train").to_pandas()
    validation = pq.read_table(folder / "validation").to_pandas()
    assert {"input_ids", "labels", "parts", "prompt"} <= set(train.columns)
    assert "label_id" not in train.columns
    # No prompt is both trained on and evaluated on.
    assert not set(train["prompt"]) & set(validation["prompt"])
    # Only assistant tokens are trained; every row trains on something.
    for ids, labels in zip(train["input_ids"], train["labels"]):
        trained = [i for i, lab in zip(ids, labels) if lab != -100]
        assert 0 < len(trained) < len(ids)
    assert "raw_text" in validation.columns and "raw_text" not in train.columns


def test_train_logs_perplexity_and_generations_and_registers_a_pyfunc(setup):
    path, c = str(setup["path"]), setup["client"]
    result = runner.invoke(app, ["train", path])
    assert result.exit_code == 0, result.output
    assert "packing:" in result.output
    champion = c.get_model_version_by_alias("chatlm", "champion")
    run = c.get_run(champion.run_id)
    metrics = run.data.metrics
    assert {"val_perplexity", "val_token_accuracy", "val_rouge_l", "val_exact_match"} <= set(
        metrics
    )
    assert metrics["val_perplexity"] > 1.0
    tables = [a.path for a in c.list_artifacts(run.info.run_id, "generations")]
    assert len(tables) == 2  # one table per evaluation (2 epochs)
    local = c.download_artifacts(run.info.run_id, tables[-1], str(setup["tmp"] / "gen"))
    with open(local) as handle:
        table = json.load(handle)
    assert set(table["columns"]) >= {"prompt", "reference", "output", "rouge_l", "step"}
    assert len(table["data"]) == 3
    # The registered version predicts with MLflow alone: no lepton_ray import in the caller.
    script = (
        "import mlflow, pandas as pd, sys\n"
        f"mlflow.set_tracking_uri({setup['raw']['tracking']['tracking_uri']!r})\n"
        "m = mlflow.pyfunc.load_model('models:/chatlm@champion')\n"
        "df = pd.DataFrame({'prompt': ['What is 2 plus 3?', None], 'messages': [None, "
        "[{'role': 'user', 'content': 'Spell stone.'}]]})\n"
        "out = m.predict(df, params={'max_new_tokens': 4})\n"
        "assert 'lepton_ray' not in sys.modules.get('__main__').__dict__\n"
        "print(out.to_json(orient='records'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 2
    assert all(isinstance(r["text"], str) and r["completion_tokens"] >= 1 for r in rows)
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)
    signature = champion_signature(c, champion)
    assert "max_new_tokens" in signature


def champion_signature(client, version) -> str:
    import mlflow

    mlflow.set_tracking_uri(client._tracking_client.tracking_uri)
    info = mlflow.models.get_model_info(f"models:/{version.name}/{version.version}")
    return str(info.signature)


def test_the_gate_compares_perplexity(setup):
    result = runner.invoke(app, ["train", str(setup["path"])])
    assert result.exit_code == 0, result.output
    assert "val_perplexity" in result.output
    assert "champion" in result.output


def test_fsdp2_trains_a_causal_lm_on_cpu(setup, tmp_path):
    data = write_chats_jsonl(tmp_path / "chats.jsonl", n=120, seed=4)
    raw = lm_config(
        tmp_path,
        data,
        name="chatfsdp",
        train={
            "epochs": 1,
            "strategy": "fsdp",
            "fsdp_min_params_per_worker": 1000,
            "max_steps_per_epoch": 3,
            "generation": {"samples": 2, "max_new_tokens": 4},
        },
    )
    raw["peft"] = {"method": "none"}
    path = write_yaml(tmp_path / "fsdp.yaml", raw)
    assert runner.invoke(app, ["preprocess", str(path)]).exit_code == 0
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "fsdp x 2" in result.output
    assert "val_perplexity" in result.output


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        (
            [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}],
            "unknown role",
        ),
        ([{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}], "empty"),
    ],
)
def test_a_malformed_conversation_is_one_clear_error(setup, tmp_path, turns, message):
    data = write_chats_jsonl(tmp_path / "chats.jsonl", n=30, seed=1)
    with data.open("a") as handle:
        handle.write(json.dumps({"messages": turns}) + "\n")
    raw = lm_config(tmp_path, data, name="badchat")
    path = write_yaml(tmp_path / "bad.yaml", raw)
    result = runner.invoke(app, ["preprocess", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "storage" / "badchat" / "data" / "manifest.json").exists()


def _long_prompt_chats(path, long: int, short: int):
    """``short`` small conversations and ``long`` ones whose system prompt is ~120 tokens
    (each different) before a short answer: over max_length 64 only by their prompt."""
    import random

    rng = random.Random(5)
    words = ["river", "stone", "maple", "cloud", "amber", "north", "pixel", "ocean", "lemon"]
    with path.open("w") as handle:
        for i in range(long + short):
            turns = [
                {"role": "user", "content": f"Name item {i}."},
                {"role": "assistant", "content": f"Item {i}"},
            ]
            if i < long:
                rules = " ".join(rng.choice(words) for _ in range(100))
                turns.insert(0, {"role": "system", "content": f"Rules {i}: {rules}"})
            handle.write(json.dumps({"messages": turns}) + "\n")
    return path


@pytest.mark.parametrize("policy", ["drop", "truncate_prompt"])
def test_too_long_examples_are_dropped_or_cut_and_counted(setup, tmp_path, policy):
    data = _long_prompt_chats(tmp_path / "long.jsonl", long=12, short=48)
    raw = lm_config(tmp_path, data, name=f"long-{policy.replace('_', '-')}")
    raw["data"]["max_length"] = 64
    raw["data"]["chat"]["too_long"] = policy
    path = write_yaml(tmp_path / "long.yaml", raw)
    result = runner.invoke(app, ["preprocess", str(path)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "storage" / raw["name"] / "data"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows_read"] == manifest["kept"] + sum(manifest["dropped"].values())
    cut = manifest["prompts_cut"]
    assert cut["policy"] == policy
    if policy == "drop":
        assert manifest["dropped"].get("too_long_tokens") == 12 and cut["rows"] == 0
        assert manifest["kept"] == 48
    else:
        assert "too_long_tokens" not in manifest["dropped"] and manifest["kept"] == 60
        assert cut["rows"] == 12 and sum(cut["per_split"].values()) == 12
        assert "12 kept with the prompt's first tokens cut" in result.output
    for split in ("train", "validation", "test"):
        if not (folder / split).exists():
            continue
        table = pq.read_table(folder / split).to_pandas()
        for ids, labels in zip(table["input_ids"], table["labels"]):
            assert len(ids) <= 64
            assert [t for t in labels if t != -100]  # the answer is always kept whole


def test_a_sweep_over_lr_lora_shape_and_packing_minimises_perplexity(setup, tmp_path):
    """tune with the same YAML: train.lr, peft.lora.r / lora_alpha and data.packing; the
    metric val_perplexity is minimised; each trial trains what its parameters say (its LoRA size, its row shape)."""
    from lepton_ray.config import validate_experiment
    from lepton_ray.data.preprocess import run_preprocess
    from lepton_ray.tracking.mlflow import tracked_run
    from lepton_ray.tune.driver import run_tune

    data = write_chats_jsonl(tmp_path / "chats.jsonl", n=160, seed=4)
    raw = lm_config(tmp_path, data, name="chatsweep", data={"packing": True})
    raw["train"].update(epochs=1, max_steps_per_epoch=4)
    raw["scaling"] = {"num_workers": 1, "resources_per_worker": {"CPU": 1}}
    raw["tune"] = {
        "enabled": True,
        "metric": "val_perplexity",
        "num_samples": 2,
        "seed": 5,  # its second trial takes r=4 and no packing; the first is the config's
        "space": {
            "train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
            "peft.lora.r": {"type": "choice", "values": [4, 8]},
            "peft.lora.lora_alpha": {"type": "choice", "values": [8, 16]},
            "data.packing": {"type": "choice", "values": [True, False]},
        },
    }
    cfg = validate_experiment(raw)
    assert cfg.tune.mode == "min"
    manifest = run_preprocess(cfg, log=lambda _: None)
    lines: list[str] = []
    with tracked_run(cfg, "tune") as parent:
        result = run_tune(cfg, manifest, parent, log=lines.append)
    trials = result["trials"]
    assert len(trials) == 2 and not any(t["error"] for t in trials)
    scores = [t["metrics"]["val_perplexity"] for t in trials]
    assert all(1.0 < s < float("inf") for s in scores)
    assert result["metrics"]["val_perplexity"] == min(scores)
    client = setup["client"].__class__(cfg.tracking.tracking_uri)
    row_tokens: dict[bool, list[float]] = {}
    for trial in trials:
        params = trial["params"]
        assert set(cfg.tune.space) <= set(params)
        run = client.get_run(trial["run_id"])
        assert run.data.params["data.packing"] == str(params["data.packing"])
        assert run.data.params["peft.lora.r"] == str(params["peft.lora.r"])
        # SmolLM2's config fixes head_dim at 64, so q_proj is 64 -> 256 and v_proj 64 -> 128
        # (2 KV heads); LoRA on both in 2 layers: (320 + 192) * 2 = 1024 weights per rank.
        assert run.data.metrics["params_trainable"] == 1024 * params["peft.lora.r"]
        m = run.data.metrics
        per_row = m["train_tokens_per_s"] / m["train_samples_per_s"]
        row_tokens.setdefault(params["data.packing"], []).append(per_row)
    assert set(row_tokens) == {True, False}, row_tokens  # the seed samples both
    # A packed row holds several examples (up to max_length 96 tokens), an unpacked row one.
    assert min(row_tokens[True]) > 1.5 * max(row_tokens[False]), row_tokens


def test_a_crashed_packed_run_resumes_mid_epoch_and_ends_as_an_unbroken_one(setup, tmp_path):
    """The training loop without Ray (a GPU box runs it so): the run dies right after step
    4's checkpoint; resumed from it, it goes on from step 4, never trains steps 1-4 again,
    and ends with the losses of a run that was never interrupted (packed rows included)."""
    from lepton_ray.config import validate_experiment
    from lepton_ray.data.preprocess import run_preprocess
    from lepton_ray.train import standalone

    data = write_chats_jsonl(tmp_path / "chats.jsonl", n=160, seed=5)
    train = {"epochs": 2, "eval_every_steps": 2, "precision": "fp32", "log_every_steps": 1}
    raw = lm_config(tmp_path, data, name="chatresume", data={"packing": True}, train=train)
    cfg = validate_experiment(raw)
    manifest = run_preprocess(cfg, log=lambda _: None)
    whole = standalone.train_standalone(cfg, manifest, tmp_path / "whole", log=lambda _: None)
    steps = [h["step"] for h in whole["history"]]
    assert steps[:2] == [2, 4] and steps[-1] == 12, steps  # 6 steps an epoch

    class Crash(Exception):
        pass

    saved = []
    real = standalone.shutil.copytree

    def copy_then_crash(src, dst, *args, **kw):  # dies right after step 4's checkpoint
        out = real(src, dst, *args, **kw)
        if Path(dst).name == "last":
            saved.append(dst)
            if len(saved) == 2:
                raise Crash()
        return out

    standalone.shutil.copytree = copy_then_crash
    try:
        with pytest.raises(Crash):
            standalone.train_standalone(cfg, manifest, tmp_path / "part", log=lambda _: None)
    finally:
        standalone.shutil.copytree = real

    resumed = cfg.model_copy(deep=True)
    resumed.train.resume_from = str(tmp_path / "part" / "last")
    lines: list[str] = []
    rest = standalone.train_standalone(resumed, manifest, tmp_path / "rest", log=lines.append)
    assert any(line.endswith("epoch 1, batch 4, step 4") for line in lines), lines
    evaluated = [int(m[1]) for line in lines if (m := re.match(r"\[train\] step (\d+) ", line))]
    assert evaluated == steps[2:]  # nothing up to step 4 ran again
    pattern = r"\[train\] epoch (\d+)/2 step (\d+)/6 "
    trained = [(int(m[1]), int(m[2])) for line in lines if (m := re.match(pattern, line))]
    assert trained[0] == (1, 5) and len(trained) == 12 - 4, trained  # steps 5 to 12
    assert [h["step"] for h in rest["history"]] == steps
    for mine, theirs in zip(rest["history"][2:], whole["history"][2:]):
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-6)
        assert mine["val_token_accuracy"] == pytest.approx(theirs["val_token_accuracy"])
