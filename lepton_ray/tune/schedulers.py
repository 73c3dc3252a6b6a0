"""The trial schedulers ``tune.scheduler`` names, built from the config."""

from __future__ import annotations

from lepton_ray.config import ExperimentConfig


def trial_scheduler(cfg: ExperimentConfig):
    """ASHA, the median stopping rule, HyperBand or FIFO, with the sweep's time attribute and a
    ``max_t`` that is the trials' own length."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    from lepton_ray.tune.report import max_t

    s = cfg.tune.scheduler
    top = max_t(cfg)
    grace = min(s.grace_period, top)
    if s.type == "asha":
        return ASHAScheduler(
            time_attr=s.time_attr,  # epochs reported as a fraction when evaluating every N steps
            max_t=top,
            grace_period=grace,
            reduction_factor=s.reduction_factor,
        )
    if s.type == "median":
        return MedianStoppingRule(
            time_attr=s.time_attr,
            grace_period=grace,
            min_samples_required=s.min_samples_required,
        )
    if s.type == "hyperband":
        return hyperband(time_attr=s.time_attr, max_t=top, reduction_factor=s.reduction_factor)
    return FIFOScheduler()


def hyperband(**kwargs):
    """Ray Tune's HyperBand, with its bracket-end hang fixed.

    Tune's HyperBand pauses a trial that reaches its bracket's last milestone until the
    bracket's other trials get there too. If one of those then fails or ends early, Tune
    drops it from the bracket but only re-examines brackets that still have a halving to do,
    so in a finished bracket the paused trial is never stopped and the sweep never ends. Here,
    a removal that leaves its bracket finished stops the bracket's paused trials, as the
    last trial's own result would have done."""
    from ray.tune.schedulers import HyperBandScheduler

    class HyperBand(HyperBandScheduler):
        def on_trial_remove(self, tune_controller, trial):
            bracket, _ = self._trial_info[trial]
            super().on_trial_remove(tune_controller, trial)
            if bracket.finished():
                bracket.cleanup_full(tune_controller)

    return HyperBand(**kwargs)
