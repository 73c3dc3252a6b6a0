"""``run_tune``: a Tune sweep where every trial is a Ray Train run and a nested MLflow run."""

from __future__ import annotations

from typing import Any

from lepton_ray.config import ExperimentConfig, apply_overrides
from lepton_ray.train.worker import ray_storage

TAG_SWEEP_KEY = "lepton.sweep_key"
TAG_STARTS = "lepton.trial_starts"


def sweep_key(cfg: ExperimentConfig, manifest: dict[str, Any]) -> str:
    """Same data, training settings and sweep -> the same key: what ``--resume`` matches."""
    import hashlib
    import json

    from lepton_ray.train.driver import training_key

    blob = json.dumps([training_key(cfg, manifest), cfg.model_dump(mode="json")["tune"]])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def sweep_name(cfg: ExperimentConfig, parent_run_id: str) -> str:
    """The Tune experiment's folder under the storage path (stable: ``--resume`` reopens it)."""
    return f"{cfg.name}-tune-{parent_run_id[:8]}"


def trial_run(cfg: ExperimentConfig, parent_run_id: str, trial_id: str):
    """The MLflow run a trial already has (it is resumed, retried or unpaused), or None:
    one run per trial."""
    from lepton_ray.tracking.mlflow import TAG_PARENT, TAG_TRIAL_ID, experiment_runs

    runs = experiment_runs(
        cfg,
        f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial_id}'",
        max_results=1,
    )
    return runs[0] if runs else None


def train_driver_fn(
    params: dict[str, Any],
    base: dict[str, Any],
    manifest: dict[str, Any],
    parent_run_id: str,
    datasets: dict,
) -> None:
    """One Tune trial: apply the sampled values, then run a TorchTrainer reporting to Tune.
    A trial that restarts (a resumed sweep, a retry, HyperBand's pause) reopens its MLflow
    run, and its Ray Train run (same name) restores its latest checkpoint."""
    import json

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
    from lepton_ray.tune.report import TAG_SEARCHER_VALUES
    from lepton_ray.tune.space import dimensions, overrides, searcher_values

    swept = validate_experiment(base, check_files=False)
    values = overrides(params, swept.tune.space)
    # The trial's config is its point, as best_config.yaml writes it: one training run.
    cfg = apply_overrides(swept, {**values, "tune.enabled": False})
    trial_id = ray.tune.get_context().get_trial_id()
    tags = lineage_tags(
        cfg, manifest.get("fingerprint"), **{TAG_STAGE: "trial", TAG_TRIAL_ID: trial_id}
    )
    tags.update({f"lepton.param.{k}": str(v) for k, v in values.items()})
    tags[TAG_SEARCHER_VALUES] = json.dumps(searcher_values(params, dimensions(swept)))
    earlier = trial_run(cfg, parent_run_id, trial_id)
    resume = earlier.info.run_id if earlier is not None else None
    # How many times this trial has started: a retry (tune.max_failures), a scheduler's
    # pause (HyperBand) or a resumed sweep starts it again in the same run.
    starts = 1 if earlier is None else int(earlier.data.tags.get(TAG_STARTS, "1")) + 1
    tags[TAG_STARTS] = str(starts)
    # On an error the sweep settles the run's status: a scheduler's stop arrives as an
    # interruption that may land after the sweep has already recorded the trial as stopped.
    with tracked_run(
        cfg,
        f"trial-{trial_id}",
        tags=tags,
        parent_run_id=parent_run_id,
        settle_errors=False,
        resume_run_id=resume,
    ) as run_id:
        if resume is None:
            # Only the parameters this trial used: keys under a branch it did not take are
            # left out, not logged with the config's unused defaults.
            unused = set(swept.tune.space) - set(values)
            log_config(cfg.tracking.tracking_uri, run_id, cfg, leave_out=unused)
        trainer = build_trainer(
            cfg,
            manifest,
            run_id,
            name=f"{cfg.name}-{parent_run_id[:8]}-trial-{trial_id}",
            callbacks=[TuneReportCallback()],
            datasets=datasets,
        )
        fit(trainer)


def _searcher(cfg: ExperimentConfig, dims, log=print):
    from optuna.storages import InMemoryStorage
    from ray.tune.search.optuna import OptunaSearch

    from lepton_ray.tune.space import DefineByRun, first_point, sampler, study_of

    t = cfg.tune
    storage = None
    if t.warm_start:
        points = warm_start_points(cfg, dims)
        storage = InMemoryStorage()
        seeded = len(study_of(dims, t.mode, points, storage=storage).trials)
        log(
            f"[tune] warm start: {seeded} finished trials of experiment '{t.warm_start}' "
            f"seed the searcher ({len(points) - seeded} outside this space left out)"
        )
    # The config's own point goes first, as a baseline; a grid enumerates every point
    # itself (an enqueued point is not marked as one of its own, so it would come twice).
    first = first_point(cfg, dims) if t.search != "grid" else {}
    return OptunaSearch(
        space=DefineByRun(dims, cfg.model_dump(mode="json")),
        metric=t.metric,
        mode=t.mode,
        sampler=sampler(t, dims),
        storage=storage,
        points_to_evaluate=[first] if first else None,
    )


def warm_start_points(cfg: ExperimentConfig, dims) -> list[tuple[dict[str, Any], float]]:
    """The finished trials of the experiment ``tune.warm_start`` names, read from MLflow:
    their searcher values and their best ``tune.metric``."""
    import json

    from lepton_ray.errors import ConfigError
    from lepton_ray.tracking.mlflow import client
    from lepton_ray.tune.report import TAG_SEARCHER_VALUES

    t = cfg.tune
    c = client(cfg.tracking.tracking_uri)
    experiment = c.get_experiment_by_name(t.warm_start)
    if experiment is None:
        raise ConfigError(f"tune.warm_start: no MLflow experiment named '{t.warm_start}'")
    runs = c.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`lepton.stage` = 'trial' and attributes.status != 'FAILED'",
        max_results=5000,
    )
    points = []
    for run in runs:
        value = run.data.metrics.get(f"best_{t.metric}")
        searched = run.data.tags.get(TAG_SEARCHER_VALUES)
        if value is None or not searched or run.info.status == "RUNNING":
            continue
        points.append((json.loads(searched), float(value)))
    if not points:
        raise ConfigError(
            f"tune.warm_start: experiment '{t.warm_start}' holds no finished trial that "
            f"reported best_{t.metric}"
        )
    return points


def run_tune(
    cfg: ExperimentConfig,
    manifest: dict[str, Any],
    parent_run_id: str,
    log=print,
    resume: bool = False,
) -> dict[str, Any]:
    """Sweep ``cfg.tune.space``; returns the best trial's MLflow run id and its metrics.

    ``resume``: continue the sweep this parent run started (``Tuner.restore``): finished
    trials are kept, unfinished ones restart from their latest checkpoint."""
    import os

    import ray
    from ray import tune

    from lepton_ray.config.space import grid_size
    from lepton_ray.train.distill import pin_teacher
    from lepton_ray.train.driver import load_split_dataset, preflight
    from lepton_ray.tune.report import table_callback
    from lepton_ray.tune.schedulers import trial_scheduler
    from lepton_ray.tune.space import dimensions, independent

    preflight(cfg, manifest, "each tune trial")
    cfg = pin_teacher(cfg)
    t = cfg.tune
    dims = dimensions(cfg)
    cpus = ray.cluster_resources().get("CPU", 1)
    per_trial = cfg.scaling.num_workers * cfg.scaling.resources_per_worker.get("CPU", 1)
    concurrent = t.max_concurrent_trials or max(1, int(cpus // max(per_trial, 1e-9)))
    samples = min(t.num_samples, grid_size(dims)) if t.search == "grid" else t.num_samples
    trainable = tune.with_resources(
        # The trial only drives; its Ray Train workers hold the CPUs. Tune refuses an empty
        # request, so the driver reserves a token 1 MiB of memory and no CPU (a CPU here
        # would starve the workers on a small machine).
        tune.with_parameters(
            train_driver_fn,
            base=cfg.model_dump(mode="json"),
            manifest=manifest,
            parent_run_id=parent_run_id,
            datasets={split: load_split_dataset(cfg, split) for split in ("train", "validation")},
        ),
        {"cpu": 0, "memory": 1024 * 1024},
    )
    storage, storage_fs = ray_storage(cfg)
    path = os.path.join(storage, sweep_name(cfg, parent_run_id))
    shown = f"{cfg.checkpoint_root}/{sweep_name(cfg, parent_run_id)}"
    # Tune saves the sweep's state every few seconds (not adaptively, every minute or
    # more): a driver killed between saves loses little on --resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    if resume and tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
        log(f"[tune] resuming the sweep in {shown}: finished trials are kept")
        tuner = tune.Tuner.restore(
            path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            storage_filesystem=storage_fs,
        )
    else:
        if resume:
            log(f"[tune] no sweep state in {shown} to resume: starting the sweep there")
        scheduler = t.scheduler.type
        log(
            f"[tune] {samples} trials over {sorted(t.space)}, {concurrent} at a time, "
            f"optimising {t.metric} ({t.mode}) with Optuna {t.search}"
            + ("" if scheduler == "none" else f" + {scheduler}")
        )
        if loose := independent(t, dims):
            log(
                f"[tune] {t.search} samples {', '.join(loose)} at random (it models only numbers every trial has)"
            )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=t.metric,
                mode=t.mode,
                search_alg=_searcher(cfg, dims, log),
                scheduler=trial_scheduler(cfg),
                num_samples=samples,
                max_concurrent_trials=concurrent,
            ),
            run_config=tune.RunConfig(
                name=sweep_name(cfg, parent_run_id),
                storage_path=storage,
                storage_filesystem=storage_fs,
                verbose=0,  # the trial table below says what Tune's own table would
                callbacks=[table_callback(cfg, log)],
                failure_config=tune.FailureConfig(max_failures=t.max_failures),
            ),
        )
    results = tuner.fit()
    return summarize_trials(cfg, results, parent_run_id, log)


def summarize_trials(
    cfg: ExperimentConfig, results, parent_run_id: str, log=print
) -> dict[str, Any]:
    """Match Tune's trials to their MLflow runs, mark early stops (who, at which rung),
    plot, pick and tag the best, and print its config as YAML."""
    from lepton_ray.errors import LeptonError
    from lepton_ray.tracking.mlflow import TAG_PARENT, TAG_TRIAL_ID, client, log_dict, set_tags
    from lepton_ray.tune.report import TAG_RUNG, TAG_STOPPED_BY, rung, stop_line, stop_reason
    from lepton_ray.tune.space import dimensions, overrides, searcher_values

    t = cfg.tune
    uri = cfg.tracking.tracking_uri
    c = client(uri)
    runs = c.search_runs(
        [c.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`lepton.stage` = 'trial'",
        max_results=5000,
    )
    by_trial = {run.data.tags.get(TAG_TRIAL_ID): run for run in runs}
    dims = dimensions(cfg)
    attr = cfg.tune.scheduler.time_attr
    trials = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or _trial_id_of(result)
        run = by_trial.get(trial_id)
        reached = round(float(metrics.get(attr, 0)), 3)
        stopped_by = stop_reason(metrics, cfg, result.error)
        run_metrics: dict[str, float] = {}
        starts = 0
        if run is not None:
            # Re-read: the search above may predate the trial's last writes.
            latest = c.get_run(run.info.run_id)
            run_metrics = dict(latest.data.metrics)
            starts = int(latest.data.tags.get(TAG_STARTS, "1"))
            if stopped_by is not None:
                step = rung(cfg, reached)
                set_tags(
                    uri,
                    run.info.run_id,
                    {
                        "lepton.early_stopped": "true",
                        TAG_STOPPED_BY: stopped_by,
                        "lepton.epochs_run": round(float(metrics.get("epoch", 0)), 3),
                        **({} if step is None else {TAG_RUNG: step}),
                    },
                )
            if stopped_by not in (None, "early_stopping"):
                c.set_terminated(run.info.run_id, status="KILLED")
            elif result.error is not None:
                c.set_terminated(run.info.run_id, status="FAILED")
            elif latest.info.status == "RUNNING":
                c.set_terminated(run.info.run_id, status="FINISHED")
        config = result.config or {}
        trials.append(
            {
                "trial_id": trial_id,
                "run_id": run.info.run_id if run is not None else None,
                "params": overrides(config, t.space),
                "searcher_values": searcher_values(config, dims),
                "metrics": {
                    t.metric: run_metrics.get(f"best_{t.metric}"),
                    "epochs": round(float(metrics.get("epoch", 0)), 3),
                    attr: reached,
                },
                "early_stopped": stopped_by is not None,
                "stopped_by": stopped_by,
                "rung": rung(cfg, reached),
                "stop": stop_line(cfg, stopped_by, reached),
                "error": str(result.error).splitlines()[0] if result.error else None,
                "starts": starts,
            }
        )
    usable = [tr for tr in trials if tr["run_id"] and tr["metrics"][t.metric] is not None]
    if not usable:
        errors = "; ".join(tr["error"] for tr in trials if tr["error"]) or "no trial reported"
        raise LeptonError(f"tune: every trial failed ({errors})")
    for tr in trials:
        log(
            f"[tune] trial {tr['trial_id']}: {t.metric}={tr['metrics'][t.metric]} "
            f"params={tr['params']}"
            + (f" ({tr['stop']})" if tr["stop"] else "")
            + (f" (started {tr['starts']} times)" if tr["starts"] > 1 else "")
            + (f" ERROR {tr['error']}" if tr["error"] else "")
        )
    pick = max if t.mode == "max" else min
    best = pick(usable, key=lambda tr: tr["metrics"][t.metric])
    if t.objective == "served":
        from lepton_ray.tune.served import select_served

        best = select_served(cfg, usable, parent_run_id, log)
    set_tags(uri, best["run_id"], {"lepton.best_trial": "true"})
    set_tags(uri, parent_run_id, {"lepton.best_trial_id": best["trial_id"]})
    log_dict(uri, parent_run_id, {"best": best, "trials": trials}, "tune/trials.json")
    _sweep_pictures(cfg, dims, usable, parent_run_id, log)
    served = " (the served winner)" if t.objective == "served" else ""
    log(
        f"[tune] best trial {best['trial_id']}{served}: {t.metric}={best['metrics'][t.metric]:.4f} "
        f"{best['params']}"
    )
    _best_config(cfg, best, parent_run_id, log)
    return {
        "run_id": best["run_id"],
        "metrics": best["metrics"],
        "params": best["params"],
        "trials": trials,
    }


def _trial_id_of(result) -> str | None:
    """A trial that never reported has no ``trial_id`` metric; its folder name ends in it."""
    import re

    match = re.search(r"_([0-9a-f]{5}_\d{5})_", str(getattr(result, "path", "") or ""))
    return match.group(1) if match else None


def _sweep_pictures(cfg, dims, usable, parent_run_id: str, log) -> None:
    from lepton_ray.tracking import plots
    from lepton_ray.tracking.mlflow import log_figure
    from lepton_ray.tune.report import optuna_figures

    t = cfg.tune
    uri = cfg.tracking.tracking_uri
    log_figure(
        uri, parent_run_id, plots.sweep(usable, t.metric, sorted(t.space)), "plots/sweep.png"
    )
    points = [(tr["searcher_values"], tr["metrics"][t.metric]) for tr in usable]
    for path, figure in optuna_figures(dims, t.mode, points, log).items():
        log_figure(uri, parent_run_id, figure, path)


def _best_config(cfg, best: dict[str, Any], parent_run_id: str, log) -> None:
    """The best trial's config as YAML: printed, written beside the run's outputs and
    logged to the sweep's run; ``lepton-ray train`` takes it as it is."""
    from lepton_ray.tracking.mlflow import client
    from lepton_ray.tune.report import best_config_yaml

    header = (
        f"Best trial {best['trial_id']} of sweep {parent_run_id} "
        f"({cfg.tune.metric} {best['metrics'][cfg.tune.metric]:.4f}): "
        f"lepton-ray train this file to train it again."
    )
    text = best_config_yaml(cfg, best["params"], header)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir / "best_config.yaml"
    partial = path.with_suffix(".yaml.partial")
    partial.write_text(text)
    partial.replace(path)
    client(cfg.tracking.tracking_uri).log_text(parent_run_id, text, "tune/best_config.yaml")
    log(f"[tune] best config ({path}):\n{text.rstrip()}")
