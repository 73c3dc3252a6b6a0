"""tune.metric and tune.mode agree: the mode is inferred from the metric when left out, a
contradicting pair is refused at validate, and every consumer of the mode sees the inferred one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lepton_ray.config import REPORTED_METRICS, apply_overrides, metric_mode, validate_experiment
from lepton_ray.errors import ConfigError
from lepton_ray.registry.versions import gate
from tests.conftest import ROOT, smoke_config

DATA = ROOT / "experiments" / "data" / "reviews.csv"


UNGATED = {"registry": {"promotion": "always"}, "compress": {"enabled": False}}


def _cfg(tmp_path, sections=None, **tune):
    raw = smoke_config(tmp_path, DATA, tune={"enabled": False, **tune}, **(sections or {}))
    return validate_experiment(raw)


@pytest.mark.parametrize(
    ("metric", "mode"),
    [
        ("val_loss", "min"),
        ("train_loss", "min"),
        ("val_accuracy", "max"),
        ("val_macro_f1", "max"),
        ("val_macro_precision", "max"),
        ("val_macro_recall", "max"),
    ],
)
def test_the_mode_is_inferred_from_the_metric(tmp_path, metric, mode):
    sections = UNGATED if metric == "train_loss" else None
    assert _cfg(tmp_path, sections, metric=metric).tune.mode == mode
    assert _cfg(tmp_path, sections, metric=metric, mode=mode).tune.mode == mode


@pytest.mark.parametrize(
    "sections",
    [
        {"compress": {"enabled": False}},  # the promotion gate alone
        {"registry": {"promotion": "always"}, "compress": {"enabled": True}},  # max_drop alone
    ],
)
def test_a_gate_metric_no_candidate_is_scored_on_is_refused(tmp_path, sections):
    with pytest.raises(ConfigError, match="tune.metric train_loss is not measured on validation"):
        _cfg(tmp_path, sections, metric="train_loss")


def test_every_reported_metric_has_a_direction():
    assert {m: metric_mode(m) for m in REPORTED_METRICS if metric_mode(m) is None} == {}
    assert metric_mode("val_roc_auc") == "max"


@pytest.mark.parametrize(("metric", "mode"), [("val_loss", "max"), ("val_accuracy", "min")])
def test_a_contradicting_pair_is_refused_naming_both_keys(tmp_path, metric, mode):
    with pytest.raises(ConfigError) as refused:
        _cfg(tmp_path, metric=metric, mode=mode)
    message = str(refused.value)
    assert "tune.mode" in message and "tune.metric" in message and metric in message, message
    assert len(message.splitlines()) == 1


def test_the_consumers_of_the_mode_see_the_inferred_one(tmp_path):
    from lepton_ray.train.loop import LoopSettings

    cfg = _cfg(tmp_path, metric="val_loss")
    assert LoopSettings.from_config(cfg).mode == "min"  # early stopping, best checkpoint
    # A Tune trial's config is the dumped config with the swept values set: still min.
    assert apply_overrides(cfg, {"train.lr": 0.01}).tune.mode == "min"
    assert cfg.model_dump()["tune"]["mode"] == "min"  # logged params, the config hash


def test_the_gate_minimises_a_loss_whatever_mode_an_old_version_recorded():
    def version(number, loss):
        tags = {
            "lepton.metric_name": "val_loss",
            "lepton.metric_mode": "max",  # written before the mode was checked
            "lepton.eval_split": "s",
            "lepton.metric.val_loss": str(loss),
        }
        return SimpleNamespace(version=number, tags=tags)

    assert not gate(version("2", 0.9), version("1", 0.3), 0.0).passed
    assert gate(version("2", 0.2), version("1", 0.3), 0.0).passed
