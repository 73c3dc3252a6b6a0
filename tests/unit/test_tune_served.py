"""Serving-aware selection without a sweep: the config it takes, the winner under
constraints and on the Pareto front, the side-by-side rankings, and batch latency."""

from __future__ import annotations

import math

import pytest
import torch

from lepton_ray.config import validate_experiment
from lepton_ray.errors import ConfigError, StageError
from lepton_ray.tune.served import choose, meets, pareto_front, summary_lines
from tests.conftest import smoke_config


def _cfg(tmp_path, **tune):
    raw = smoke_config(tmp_path, tmp_path / "reviews.csv")
    raw["tune"] = {
        "enabled": True,
        "metric": "val_accuracy",
        "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        **tune,
    }
    return validate_experiment(raw, check_files=False)


def _row(trial: str, served: float, p50: float, batch: float = 5.0, flt: float = 0.9) -> dict:
    return {
        "trial_id": trial,
        "run_id": f"run-{trial}",
        "params": {},
        "float": flt,
        "served": served,
        "format": "dynamic_int8",
        "compression": "dynamic_int8: within",
        "p50_ms": p50,
        "p50_ms_batch": batch,
    }


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"constraints": {"p50_ms": 20}}, "tune.constraints applies to served models"),
        ({"latency_objective": True}, "tune.latency_objective applies to served models"),
        ({"objective": "served", "constraints": {"p99_ms": 20}}, "p99_ms"),
        ({"objective": "served", "constraints": {"p50_ms": 0}}, "p50_ms"),
        ({"objective": "served", "served_top_k": 0}, "served_top_k"),
        (
            {"objective": "served", "metric": "train_loss"},
            "tune.objective served scores served models on validation rows",
        ),
    ],
)
def test_served_settings_are_checked_before_a_trial(tmp_path, tune, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, **tune)


def test_the_best_served_metric_within_the_constraints_wins(tmp_path):
    cfg = _cfg(tmp_path, objective="served", constraints={"p50_ms": 10, "p50_ms_batch": 50})
    rows = [
        _row("a", 0.95, 30.0),  # best served, too slow at batch 1
        _row("b", 0.90, 8.0, batch=80.0),  # too slow at the serving batch
        _row("c", 0.85, 9.0),
        _row("d", 0.88, 9.5),
    ]
    assert meets(cfg, rows[0]) == ["p50_ms 30.00 > 10"]
    assert meets(cfg, rows[1]) == ["p50_ms_batch 80.00 > 50"]
    winner, front = choose(cfg, rows)
    assert winner["trial_id"] == "d" and front == set()
    lines = summary_lines(cfg, rows, winner, front)
    assert "WINNER" in next(line for line in lines if line.startswith("d "))
    assert lines[-1].startswith("winner: trial d")
    assert "rankings DISAGREE: by the float metric trial a would have won" in lines[-1]


def test_a_nan_latency_or_no_trial_within_the_constraints_registers_nothing(tmp_path):
    cfg = _cfg(tmp_path, objective="served", constraints={"p50_ms": 1})
    rows = [_row("a", 0.95, 3.0), _row("b", 0.90, math.nan)]
    assert meets(cfg, rows[1]) == ["p50_ms nan > 1"]
    with pytest.raises(StageError, match=r"none of the 2 served trials meets them.*trial a"):
        choose(cfg, rows)


def test_latency_as_a_second_objective_keeps_the_pareto_front(tmp_path):
    cfg = _cfg(tmp_path, objective="served", latency_objective=True)
    rows = [
        _row("a", 0.95, 30.0),
        _row("b", 0.90, 10.0),
        _row("c", 0.89, 12.0),  # dominated by b: worse and slower
        _row("d", 0.80, 2.0),
    ]
    study, front = pareto_front(cfg, rows)
    assert front == {"a", "b", "d"} and len(study.trials) == 4
    winner, chosen_front = choose(cfg, rows)
    assert winner["trial_id"] == "a" and chosen_front == front
    # Under a constraint the best metric on the front within it wins.
    cfg = _cfg(tmp_path, objective="served", latency_objective=True, constraints={"p50_ms": 11})
    winner, _ = choose(cfg, rows)
    assert winner["trial_id"] == "b"
    lines = summary_lines(cfg, rows, winner, front)
    assert "Pareto front" in next(line for line in lines if line.startswith("d "))
    assert "Pareto front" not in next(line for line in lines if line.startswith("c "))


def test_a_loss_is_minimised_and_agreeing_rankings_are_said_so(tmp_path):
    cfg = _cfg(tmp_path, objective="served", metric="val_loss")
    rows = [_row("a", 0.30, 5.0, flt=0.2), _row("b", 0.40, 4.0, flt=0.3)]
    winner, _ = choose(cfg, rows)
    assert winner["trial_id"] == "a"
    assert summary_lines(cfg, rows, winner, set())[-1].endswith(
        "the float and served rankings agree on it"
    )


def test_batch_latency_times_padded_batches_of_the_serving_size():
    from transformers import BertConfig, BertForSequenceClassification

    from lepton_ray.compress.measure import batch_latency_ms, speed
    from lepton_ray.tasks import get_task

    task = get_task("sequence_classification")
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config).eval()
    seen: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    lengths = [5, 9, 3, 7, 4, 6, 8, 2]
    ids = torch.zeros((8, 9), dtype=torch.long)
    mask = torch.zeros((8, 9), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = torch.arange(1, n + 1), 1
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(8).long()}]
    assert batch_latency_ms(task, model, batches, 4, pad=0) > 0
    # A warm-up, then the two batches of 4 rows, each padded to its own longest row.
    assert seen == [(4, 9), (4, 9), (4, 8)]
    assert math.isnan(batch_latency_ms(task, model, batches, 16, pad=0))  # too few rows
    figures = speed(task, model, batches, 0, None, serving_batch=4)
    assert set(figures) == {"latency_ms_batch1", "p50_ms_batch4"}
