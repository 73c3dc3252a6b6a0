"""Who ended a trial before its budget, at which rung, as the sweep reports it (and plots)."""

from lepton_ray.config import validate_experiment
from lepton_ray.tracking import plots
from lepton_ray.tune.report import STOP_REASONS, milestones, rung, stop_line, stop_reason
from tests.conftest import smoke_config


def _cfg(tmp_path, epochs=3, **scheduler):
    raw = smoke_config(
        tmp_path,
        tmp_path / "reviews.csv",
        train={"epochs": epochs},
        tune={
            "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
            "scheduler": scheduler,
        },
    )
    return validate_experiment(raw, check_files=False)


def test_stop_reason_tells_the_scheduler_from_the_trials_own_early_stopping(tmp_path):
    cfg = _cfg(tmp_path)
    assert stop_reason({"epoch": 1.5, "stopped_early": False}, cfg, None) == "asha"
    assert stop_reason({"epoch": 2.0, "stopped_early": True}, cfg, None) == "early_stopping"
    # Ran every epoch: nobody stopped it, even if patience ran out at the very end.
    assert stop_reason({"epoch": 3.0, "stopped_early": True}, cfg, None) is None
    assert stop_reason({"epoch": 3.0}, cfg, None) is None
    assert stop_reason({"epoch": 1.0}, cfg, RuntimeError("boom")) is None  # failed, not stopped
    assert stop_reason({"epoch": 1.0}, _cfg(tmp_path, type="median"), None) == "median"
    assert stop_reason({"epoch": 1.0}, _cfg(tmp_path, type="none"), None) is None
    assert "ASHA" not in STOP_REASONS["early_stopping"]
    assert "patience" in STOP_REASONS["early_stopping"]


def test_rungs_follow_the_grace_period_and_reduction_factor(tmp_path):
    cfg = _cfg(tmp_path, epochs=8, grace_period=1, reduction_factor=2)
    assert milestones(cfg) == [1, 2, 4]
    assert [rung(cfg, t) for t in (0.5, 1, 2.5, 4, 8)] == [0, 1, 2, 3, 3]
    line = stop_line(cfg, "asha", 2.5)
    assert "ASHA at rung 2 (epoch 2.5)" in line and "top 1/2" in line
    assert rung(_cfg(tmp_path, type="median"), 2) is None
    assert "median" in stop_line(_cfg(tmp_path, type="median"), "median", 2)
    steps = _cfg(tmp_path, time_attr="step", max_t=40, grace_period=10, reduction_factor=2)
    assert milestones(steps) == [10, 20]
    assert stop_reason({"step": 20, "epoch": 1.0}, steps, None) == "asha"
    assert stop_reason({"step": 40, "epoch": 1.0}, steps, None) is None  # its whole budget


def test_the_sweep_plot_colors_each_stop_reason_and_says_which_is_which():
    trials = [
        {"params": {"train.lr": lr}, "metrics": {"val_accuracy": acc}, "stopped_by": by}
        for lr, acc, by in ((1e-3, 0.7, None), (2e-3, 0.6, "asha"), (3e-3, 0.65, "early_stopping"))
    ]
    fig = plots.sweep(trials, "val_accuracy", ["train.lr"])
    title = fig._suptitle.get_text()
    assert "ASHA" in title and "its own early stopping" in title and "median" not in title
    colors = {tuple(c) for c in fig.axes[0].collections[0].get_facecolors()}
    assert len(colors) == 3


def test_the_sweep_plot_shows_a_branched_parameter_only_where_it_was_used():
    trials = [
        {"params": {"peft.method": "lora", "peft.lora.r": 8}, "metrics": {"m": 0.7}},
        {"params": {"peft.method": "none"}, "metrics": {"m": 0.6}},
    ]
    fig = plots.sweep(trials, "m", ["peft.lora.r", "peft.method"])
    assert len(fig.axes[0].collections[0].get_offsets()) == 1
    assert len(fig.axes[1].collections[0].get_offsets()) == 2
