"""Who ended a trial before train.epochs, as the sweep reports it (and the sweep plot)."""

from lepton_ray.tracking import plots
from lepton_ray.tune.driver import STOP_REASONS, stop_reason


def test_stop_reason_tells_asha_from_the_trials_own_early_stopping():
    assert stop_reason({"epoch": 1.5, "stopped_early": False}, 3, None) == "asha"
    assert stop_reason({"epoch": 2.0, "stopped_early": True}, 3, None) == "early_stopping"
    # Ran every epoch: nobody stopped it, even if patience ran out at the very end.
    assert stop_reason({"epoch": 3.0, "stopped_early": True}, 3, None) is None
    assert stop_reason({"epoch": 3.0}, 3, None) is None
    assert stop_reason({"epoch": 1.0}, 3, RuntimeError("boom")) is None  # failed, not stopped
    assert "ASHA" not in STOP_REASONS["early_stopping"]
    assert "patience" in STOP_REASONS["early_stopping"]


def test_the_sweep_plot_colors_each_stop_reason_and_says_which_is_which():
    trials = [
        {"params": {"train.lr": lr}, "metrics": {"val_accuracy": acc}, "stopped_by": by}
        for lr, acc, by in ((1e-3, 0.7, None), (2e-3, 0.6, "asha"), (3e-3, 0.65, "early_stopping"))
    ]
    fig = plots.sweep(trials, "val_accuracy", ["train.lr"])
    title = fig._suptitle.get_text()
    assert "ASHA" in title and "its own early stopping" in title
    colors = {tuple(c) for c in fig.axes[0].collections[0].get_facecolors()}
    assert len(colors) == 3
