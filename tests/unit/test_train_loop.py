"""The training loop and recipe without Ray (the path a GPU box without Ray runs)."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from lepton_ray.artifacts import load_tokenizer
from lepton_ray.compress.formats import load_model_artifact
from lepton_ray.config import validate_experiment
from lepton_ray.data.sample import make_reviews
from lepton_ray.tasks import get_task
from lepton_ray.train.loop import build_scheduler, is_better, lr_factor
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


def test_lr_schedules_after_warmup():
    total, warmup = 100, 10
    for schedule in ("constant", "linear", "cosine"):
        ramp = [lr_factor(s, total, warmup, schedule) for s in range(warmup)]
        assert ramp == sorted(ramp) and ramp[-1] == pytest.approx(1.0)
    assert lr_factor(50, total, warmup, "constant") == 1.0
    assert lr_factor(55, total, warmup, "linear") == pytest.approx(0.5)
    assert lr_factor(55, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_factor(32, total, warmup, "cosine") > lr_factor(32, total, warmup, "linear")
    assert lr_factor(99, total, warmup, "linear") < 0.02
    assert lr_factor(100, total, warmup, "cosine") == pytest.approx(0.0)


def _config(tmp_path, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "d.csv"
    data.write_text("review,sentiment\na,positive\n")
    base = {
        "epochs": 2,
        "batch_size": 16,
        "lr": 2e-3,
        "max_steps_per_epoch": None,
        "precision": "fp32",
    }
    return validate_experiment(smoke_config(tmp_path, data, train={**base, **train}))


def _train(cfg, manifest, out, log=lambda _: None, **kwargs):
    torch.set_num_threads(1)
    return train_standalone(cfg, manifest, out, log=log, **kwargs)


@pytest.fixture(scope="module")
def rows():
    rows = [r for r in make_reviews(500, seed=3) if r[0].strip()]
    return {"train": rows[:400], "validation": rows[400:]}


def test_same_seed_same_metrics_and_step_evaluations(tmp_path, rows):
    cfg = _config(tmp_path, eval_every_steps=10)
    manifest = write_tokenized(cfg, rows)
    a = _train(cfg, manifest, tmp_path / "a")
    b = _train(cfg, manifest, tmp_path / "b")
    # 400 rows / 16 = 25 steps an epoch: evaluations at 10, 20, 25 (epoch end), 30, 40, 50.
    assert [h["step"] for h in a["history"]] == [10, 20, 25, 30, 40, 50]
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert all(0.0 <= h["val_roc_auc"] <= 1.0 for h in a["history"])
    assert all(h["train_tokens_per_s"] > 0 for h in a["history"])


def test_resume_mid_epoch_equals_uninterrupted(tmp_path, rows):
    cfg = _config(tmp_path, eval_every_steps=10)
    manifest = write_tokenized(cfg, rows)
    whole = _train(cfg, manifest, tmp_path / "whole")

    from lepton_ray.train import standalone

    class Crash(Exception):
        pass

    seen = []
    real = standalone.shutil.copytree

    def copy_then_crash(src, dst, *args, **kw):  # the run dies right after step 20's checkpoint
        out = real(src, dst, *args, **kw)
        if Path(dst).name == "last":
            seen.append(dst)
            if len(seen) == 2:
                raise Crash()
        return out

    standalone.shutil.copytree = copy_then_crash
    try:
        with pytest.raises(Crash):
            _train(cfg, manifest, tmp_path / "part")
    finally:
        standalone.shutil.copytree = real
    resumed_cfg = cfg.model_copy(deep=True)
    resumed_cfg.train.resume_from = str(tmp_path / "part" / "last")
    lines: list[str] = []
    rest = _train(resumed_cfg, manifest, tmp_path / "rest", log=lines.append)
    assert [h["step"] for h in rest["history"]] == [10, 20, 25, 30, 40, 50]
    # It went on from step 20 and ran only what came after: a retrain from scratch would
    # give the same numbers (training is deterministic), but not these lines.
    assert any(line.endswith("epoch 1, batch 20, step 20") for line in lines), lines
    evaluated = [int(m[1]) for line in lines if (m := re.match(r"\[train\] step (\d+) ", line))]
    assert evaluated == [25, 30, 40, 50]
    trained = [line for line in lines if re.match(r"\[train\] epoch \d+/2 step ", line)]
    assert len(trained) == 3  # steps 30, 40 and 50 (every log_every_steps: 10)
    for mine, theirs in zip(rest["history"][2:], whole["history"][2:]):
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-6)
        assert mine["val_accuracy"] == theirs["val_accuracy"]


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, rows):
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    results = []
    for batch, accumulation in ((16, 1), (8, 2)):
        cfg = _config(
            tmp_path / f"{batch}", batch_size=batch, gradient_accumulation_steps=accumulation,
            group_by_length=False, epochs=1,
        )  # fmt: skip
        cfg.model.config_overrides = {**cfg.model.config_overrides, **no_dropout}
        cfg.peft.lora.lora_dropout = 0.0
        manifest = write_tokenized(cfg, rows)
        results.append(_train(cfg, manifest, tmp_path / f"out{batch}")["history"][-1])
    assert results[0]["step"] == results[1]["step"] == 25
    assert results[0]["val_loss"] == pytest.approx(results[1]["val_loss"], abs=1e-4)


def test_early_stopping_stops_and_keeps_the_best(tmp_path, rows):
    cfg = _config(tmp_path, epochs=6, lr=1e-9, early_stopping={"patience": 2}, warmup_ratio=0.0)
    manifest = write_tokenized(cfg, rows)
    result = _train(cfg, manifest, tmp_path / "out")
    # With a learning rate of 1e-9 nothing improves after the first evaluation.
    assert len(result["history"]) == 3 and result["stopped_early"]
    assert result["best_step"] == result["history"][0]["step"]


def test_is_better_respects_mode():
    assert is_better(0.9, 0.8, "max") and not is_better(0.7, 0.8, "max")
    assert is_better(0.1, 0.2, "min") and is_better(0.5, None, "min")


def _tiny_no_dropout(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    from tests.conftest import TINY_BERT

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, task=get_task("sequence_classification"), labels=["0", "1"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **TINY_BERT,
    )  # fmt: skip
    return BertForSequenceClassification(config)


UNEVEN_LENGTHS = (4, 9, 6, 3, 7, 5, 8)
UNEVEN_LABELS = (0, 1, 1, 0, 1, 0, 0)


def _uneven_rows(index=range(7)):
    """Rows ``index`` of 7 fixed ragged rows (the same ids whichever subset is taken)."""
    import numpy as np

    from lepton_ray.train.batching import TokenRows

    rng = np.random.default_rng(0)
    ids = [rng.integers(5, 50, size=k).tolist() for k in UNEVEN_LENGTHS]
    columns = {"input_ids": [ids[i] for i in index], "label_id": [UNEVEN_LABELS[i] for i in index]}
    return TokenRows.from_frames([columns], "label_id", sort_by_text=False)


def _sgd_step(model, rows, batch_size, accumulation, rank=0, world_size=1):
    """One optimizer step of run_training over all of ``rows``: SGD, lr 1, no clipping, so
    every weight moves by minus its gradient."""
    from lepton_ray.tasks.classification_eval import collate
    from lepton_ray.train.loop import LoopSettings, LoopState, run_training
    from lepton_ray.train.precision import Precision

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    settings = LoopSettings(
        epochs=1, batch_size=batch_size, accumulation=accumulation, max_grad_norm=None,
        group_by_length=False,
    )  # fmt: skip
    everything = collate(rows.sequences(range(len(rows))), rows.targets, pad_id=0)
    state = run_training(
        model, opt, build_scheduler(opt, 1, 0.0, "constant"), rows, pad_id=0,
        eval_batches=lambda: [everything], task=get_task("sequence_classification"), labels=["0", "1"], settings=settings, state=LoopState(),
        device=torch.device("cpu"), precision=Precision("fp32", "cpu", "test"), rank=rank,
        world_size=world_size, log=lambda _: None,
    )  # fmt: skip
    assert state.step == 1


def _assert_moved_by_the_full_batch_gradient(after: dict) -> None:
    from lepton_ray.tasks.classification_eval import collate

    reference = _tiny_no_dropout()
    rows = _uneven_rows()
    reference.train()
    reference(**collate(rows.sequences(range(7)), rows.targets, pad_id=0)).loss.backward()
    for name, before in reference.named_parameters():  # the mean over all 7 examples
        assert torch.allclose(before.detach() - after[name], before.grad, atol=1e-6), name


def test_accumulated_uneven_micro_batches_give_the_gradient_of_the_whole_batch():
    """7 rows, micro-batches of 3 + 3 + 1 in one step: the step is the full batch's step."""
    model = _tiny_no_dropout()
    _sgd_step(model, _uneven_rows(), batch_size=3, accumulation=3)
    _assert_moved_by_the_full_batch_gradient({n: p.detach() for n, p in model.named_parameters()})


def _ddp_step(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo DDP run: rank 0 holds rows 0-3, rank 1 rows 4-6."""
    import torch.distributed as dist

    from lepton_ray.train.parallel import wrap_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = wrap_model(_tiny_no_dropout(), "ddp", torch.device("cpu"), 2)
        shard = _uneven_rows(range(4) if rank == 0 else range(4, 7))
        _sgd_step(model, shard, batch_size=2, accumulation=2, rank=rank, world_size=2)
        if rank == 0:
            torch.save({n: p.detach() for n, p in model.module.named_parameters()}, out)
        # Both ranks leave together: a rank that tears gloo down while its peer still
        # talks to it aborts the peer ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_weighs_every_example_of_the_step_alike_across_ranks(tmp_path):
    """Rank 0 trains on 4 rows (2 + 2), rank 1 on 3 (2 + 1): the DDP step is the step of
    the mean over all 7 examples, not the mean of the ranks' (or micro-batches') means."""
    import torch.multiprocessing as mp

    from lepton_ray.runtime.cluster import free_port

    out = tmp_path / "after.pt"
    mp.spawn(_ddp_step, args=(free_port(), str(out)), nprocs=2, join=True)
    _assert_moved_by_the_full_batch_gradient(torch.load(out))
