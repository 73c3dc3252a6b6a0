"""``run_tune``: a Tune sweep where every trial is a Ray Train run and a nested MLflow run."""

from __future__ import annotations

from typing import Any

from lepton_ray.config import ExperimentConfig, apply_overrides
from lepton_ray.train.worker import ray_storage
from lepton_ray.tune.space import build_param_space, config_point


def train_driver_fn(
    params: dict[str, Any],
    base: dict[str, Any],
    manifest: dict[str, Any],
    parent_run_id: str,
    datasets: dict,
) -> None:
    """One Tune trial: apply the sampled values, then run a TorchTrainer reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lepton_ray.config import validate_experiment
    from lepton_ray.tracking.mlflow import (
        TAG_STAGE,
        TAG_TRIAL_ID,
        lineage_tags,
        log_config,
        tracked_run,
    )
    from lepton_ray.train.driver import build_trainer, fit

    cfg = apply_overrides(validate_experiment(base, check_files=False), params)
    trial_id = ray.tune.get_context().get_trial_id()
    tags = lineage_tags(
        cfg, manifest.get("fingerprint"), **{TAG_STAGE: "trial", TAG_TRIAL_ID: trial_id}
    )
    tags.update({f"lepton.param.{k}": str(v) for k, v in params.items()})
    # On an error the sweep settles the run's status: ASHA's stop arrives as an interruption
    # that may land after the sweep has already recorded the trial as stopped early.
    with tracked_run(
        cfg, f"trial-{trial_id}", tags=tags, parent_run_id=parent_run_id, settle_errors=False
    ) as run_id:
        log_config(cfg.tracking.tracking_uri, run_id, cfg)
        trainer = build_trainer(
            cfg,
            manifest,
            run_id,
            name=f"{cfg.name}-trial-{trial_id}",
            callbacks=[TuneReportCallback()],
            datasets=datasets,
        )
        fit(trainer)


def run_tune(
    cfg: ExperimentConfig, manifest: dict[str, Any], parent_run_id: str, log=print
) -> dict[str, Any]:
    """Sweep ``cfg.tune.space``; returns the best trial's MLflow run id and its metrics."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from lepton_ray.train.driver import load_split_dataset, preflight

    preflight(cfg, manifest, "each tune trial")
    t = cfg.tune
    first = config_point(cfg)
    searcher = OptunaSearch(points_to_evaluate=[first] if first else None, seed=t.seed)
    scheduler = ASHAScheduler(
        time_attr="epoch",  # reported as a fraction when evaluating every N steps
        max_t=cfg.train.epochs,
        grace_period=min(t.scheduler.grace_period, cfg.train.epochs),
        reduction_factor=t.scheduler.reduction_factor,
    )
    cpus = ray.cluster_resources().get("CPU", 1)
    per_trial = cfg.scaling.num_workers * cfg.scaling.resources_per_worker.get("CPU", 1)
    concurrent = t.max_concurrent_trials or max(1, int(cpus // max(per_trial, 1e-9)))
    log(
        f"[tune] {t.num_samples} trials over {sorted(t.space) or 'no parameters'}, "
        f"{concurrent} at a time, optimising {t.metric} ({t.mode}) with Optuna + ASHA"
    )
    trainable = tune.with_parameters(
        train_driver_fn,
        base=cfg.model_dump(mode="json"),
        manifest=manifest,
        parent_run_id=parent_run_id,
        datasets={split: load_split_dataset(cfg, split) for split in ("train", "validation")},
    )
    tuner = tune.Tuner(
        # The trial only drives; its Ray Train workers hold the CPUs. Tune refuses an empty
        # request, so the driver reserves a token 1 MiB of memory and no CPU (a CPU here
        # would starve the workers on a small machine).
        tune.with_resources(trainable, {"cpu": 0, "memory": 1024 * 1024}),
        param_space=build_param_space(t.space),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=t.num_samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=f"{cfg.name}-tune-{parent_run_id[:8]}",
            storage_path=ray_storage(cfg),
            verbose=1,
        ),
    )
    results = tuner.fit()
    return summarize_trials(cfg, results, parent_run_id, log)


STOPPED_BY_ASHA = "asha"
STOPPED_BY_PATIENCE = "early_stopping"
STOP_REASONS = {
    STOPPED_BY_ASHA: "ASHA",
    STOPPED_BY_PATIENCE: "its own early stopping (train.early_stopping.patience)",
}
TAG_STOPPED_BY = "lepton.stopped_by"


def stop_reason(metrics: dict[str, Any], epochs: int, error: BaseException | None) -> str | None:
    """Who ended a trial before ``train.epochs``: the trial itself (its early stopping saw no
    gain for ``patience`` evaluations, reported as ``stopped_early``) or ASHA (the trial was
    still going at its last report); None for a trial that ran every epoch or failed."""
    if error is not None or round(float(metrics.get("epoch", 0)), 3) >= epochs:
        return None
    return STOPPED_BY_PATIENCE if metrics.get("stopped_early") else STOPPED_BY_ASHA


def summarize_trials(
    cfg: ExperimentConfig, results, parent_run_id: str, log=print
) -> dict[str, Any]:
    """Match Tune's trials to their MLflow runs, mark early stops and who made them, plot,
    pick the best."""
    from lepton_ray.tracking import plots
    from lepton_ray.tracking.mlflow import (
        TAG_PARENT,
        TAG_TRIAL_ID,
        client,
        log_dict,
        log_figure,
        set_tags,
    )

    t = cfg.tune
    uri = cfg.tracking.tracking_uri
    c = client(uri)
    runs = c.search_runs(
        [c.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`lepton.stage` = 'trial'",
        max_results=1000,
    )
    by_trial = {run.data.tags.get(TAG_TRIAL_ID): run for run in runs}
    trials = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        run = by_trial.get(trial_id)
        epochs = round(float((result.metrics or {}).get("epoch", 0)), 3)
        stopped_by = stop_reason(result.metrics or {}, cfg.train.epochs, result.error)
        run_metrics: dict[str, float] = {}
        if run is not None:
            # Re-read: the search above may predate the trial's last writes.
            latest = c.get_run(run.info.run_id)
            run_metrics = dict(latest.data.metrics)
            if stopped_by is not None:
                set_tags(
                    uri,
                    run.info.run_id,
                    {
                        "lepton.early_stopped": "true",
                        TAG_STOPPED_BY: stopped_by,
                        "lepton.epochs_run": epochs,
                    },
                )
            if stopped_by == STOPPED_BY_ASHA:
                c.set_terminated(run.info.run_id, status="KILLED")
            elif result.error is not None:
                c.set_terminated(run.info.run_id, status="FAILED")
            elif latest.info.status == "RUNNING":
                c.set_terminated(run.info.run_id, status="FINISHED")
        best_key = f"best_{t.metric}"
        trials.append(
            {
                "trial_id": trial_id,
                "run_id": run.info.run_id if run is not None else None,
                "params": {k: v for k, v in (result.config or {}).items()},
                "metrics": {t.metric: run_metrics.get(best_key), "epochs": epochs},
                "early_stopped": stopped_by is not None,
                "stopped_by": stopped_by,
                "error": str(result.error).splitlines()[0] if result.error else None,
            }
        )
    usable = [tr for tr in trials if tr["run_id"] and tr["metrics"][t.metric] is not None]
    if not usable:
        errors = "; ".join(tr["error"] for tr in trials if tr["error"]) or "no trial reported"
        from lepton_ray.errors import LeptonError

        raise LeptonError(f"tune: every trial failed ({errors})")
    pick = max if t.mode == "max" else min
    best = pick(usable, key=lambda tr: tr["metrics"][t.metric])
    log_dict(uri, parent_run_id, {"best": best, "trials": trials}, "tune/trials.json")
    log_figure(
        uri, parent_run_id, plots.sweep(usable, t.metric, sorted(t.space)), "plots/sweep.png"
    )
    for tr in trials:
        stopped = STOP_REASONS.get(tr["stopped_by"])
        log(
            f"[tune] trial {tr['trial_id']}: {t.metric}={tr['metrics'][t.metric]} "
            f"params={tr['params']}"
            + (f" (stopped early by {stopped})" if stopped else "")
            + (f" ERROR {tr['error']}" if tr["error"] else "")
        )
    log(
        f"[tune] best trial {best['trial_id']}: {t.metric}={best['metrics'][t.metric]:.4f} {best['params']}"
    )
    return {
        "run_id": best["run_id"],
        "metrics": best["metrics"],
        "params": best["params"],
        "trials": trials,
    }
