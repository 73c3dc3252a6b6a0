"""The training loop and recipe without Ray (the path a GPU box without Ray runs)."""

import json

import pandas as pd
import pytest
import torch

from lepton_ray.config import validate_experiment
from lepton_ray.data.sample import make_reviews
from lepton_ray.models import load_model_artifact, load_tokenizer
from lepton_ray.train.loop import build_scheduler, is_better
from lepton_ray.train.standalone import train_standalone
from tests.conftest import smoke_config


def write_tokenized(cfg, rows) -> dict:
    """What `lepton-ray preprocess` writes, made with pandas for a Ray-free test."""
    tok = load_tokenizer("minilm")
    labels = ["negative", "positive"]
    counts = {}
    for split, part in rows.items():
        enc = tok([t for t, _ in part], truncation=True, max_length=cfg.data.max_length)
        frame = pd.DataFrame(
            {
                "text": [t for t, _ in part],
                "label": [lab for _, lab in part],
                "input_ids": enc["input_ids"],
                "label_id": [labels.index(lab) for _, lab in part],
            }
        )
        (cfg.data_dir / split).mkdir(parents=True, exist_ok=True)
        frame.to_parquet(cfg.data_dir / split / "part-0.parquet")
        counts[split] = len(frame)
    return {
        "labels": labels,
        "splits": counts,
        "model": "minilm",
        "max_length": cfg.data.max_length,
    }


@pytest.fixture()
def tiny(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("review,sentiment\na,positive\n")
    raw = smoke_config(
        tmp_path,
        data,
        train={"epochs": 3, "batch_size": 16, "lr": 2e-3, "max_steps_per_epoch": None},
        peft={"method": "none"},
    )
    cfg = validate_experiment(raw)
    rows = [r for r in make_reviews(500, seed=3) if r[0].strip()]
    manifest = write_tokenized(cfg, {"train": rows[:400], "validation": rows[400:]})
    return cfg, manifest


def test_standalone_training_learns_and_writes_loadable_artifact(tiny, tmp_path):
    cfg, manifest = tiny
    torch.set_num_threads(1)
    result = train_standalone(cfg, manifest, tmp_path / "out", log=lambda _: None)
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert max(h["val_accuracy"] for h in history) > 0.6  # above chance on held-out rows
    assert json.loads((tmp_path / "out" / "history.json").read_text()) == history

    # The best checkpoint is a self-contained artifact (full fine-tune: all weights).
    model, tokenizer, meta = load_model_artifact(tmp_path / "out" / "model")
    assert meta.labels == ["negative", "positive"]
    assert meta.weights == "full"
    assert (tmp_path / "out" / "model" / "model" / "model.safetensors").is_file()
    enc = tokenizer(["The lamp works perfectly."], return_tensors="pt")
    assert model(**enc).logits.shape == (1, 2)


def test_scheduler_warms_up_then_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] <= 1.0
    assert lrs[1] == pytest.approx(1.0)
    assert lrs[-1] < lrs[2]


def test_is_better_respects_mode():
    assert is_better(0.9, 0.8, "max") and not is_better(0.7, 0.8, "max")
    assert is_better(0.1, 0.2, "min") and is_better(0.5, None, "min")
