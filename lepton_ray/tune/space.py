"""``tune.space`` as Optuna's define-by-run search, the seeded samplers, and Optuna studies
rebuilt from finished trials (warm start, plots)."""

from __future__ import annotations

import json
import warnings
from typing import Any

from lepton_ray.config import ExperimentConfig, TuneSection
from lepton_ray.config.space import Dimension, compile_space, config_point, resolve


def dimensions(cfg: ExperimentConfig) -> list[Dimension]:
    return compile_space(cfg.tune.space)


def optuna_value(value: Any) -> Any:
    """A choice as Optuna stores it: Optuna takes None, bools, numbers and strings only, so
    a list or mapping (``peft.lora.target_modules: [q_proj, v_proj]``) goes as its JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def optuna_choices(dim: Dimension) -> list[Any]:
    return [optuna_value(v) for v in dim.param.values or ()]


def config_value(dim: Dimension, raw: Any) -> Any:
    """The listed value an Optuna choice stands for (``raw`` itself when it is one)."""
    for value in dim.param.values or ():
        if optuna_value(value) == raw and type(optuna_value(value)) is type(raw):
            return value
    return raw


def distribution(dim: Dimension):
    """The Optuna distribution of one dimension (its searcher value, before ``ratio_of``)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    p = dim.param
    if p.values is not None:
        return CategoricalDistribution(optuna_choices(dim))
    if p.type == "int":
        return IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return FloatDistribution(p.low, p.high, log=p.type == "loguniform", step=p.step)


def _suggest(trial, dim: Dimension) -> Any:
    p = dim.param
    if p.values is not None:
        return config_value(dim, trial.suggest_categorical(dim.name, optuna_choices(dim)))
    if p.type == "int":
        return trial.suggest_int(
            dim.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
        )
    return trial.suggest_float(dim.name, p.low, p.high, step=p.step, log=p.type == "loguniform")


class DefineByRun:
    """The search space as Optuna's define-by-run function (``OptunaSearch(space=...)``):
    a parameter is suggested only when its branch was taken. It returns the config values
    by key, which Tune adds to the trial's config beside Optuna's own names."""

    def __init__(self, dims: list[Dimension], base: dict[str, Any]):
        self.dims = dims
        self.base = base

    def __call__(self, trial) -> dict[str, Any]:
        _, values = resolve(self.dims, lambda dim: _suggest(trial, dim), self.base)
        return values


def overrides(config: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """The config keys a trial sets, from Tune's trial config (which also holds Optuna's
    names for branched and ratio parameters)."""
    return {key: value for key, value in config.items() if key in space}


def searcher_values(config: dict[str, Any], dims: list[Dimension]) -> dict[str, Any]:
    """Optuna's own values in a trial's config (those of the branches it took), as Optuna
    stores them (``optuna_value``)."""
    return {d.name: optuna_value(config[d.name]) for d in dims if d.name in config}


def independent(t: TuneSection, dims: list[Dimension]) -> list[str]:
    """The parameters ``tune.search`` cannot model and samples at random instead: CMA-ES
    and GP model only numbers every trial has (no branches; CMA-ES no choices either)."""
    if t.search not in ("cmaes", "gp"):
        return []
    return [d.name for d in dims if d.when or (t.search == "cmaes" and d.param.values is not None)]


def startup_trials(t: TuneSection) -> int:
    if t.startup_trials is not None:
        return t.startup_trials
    return max(2, min(10, t.num_samples // 3))


def sampler(t: TuneSection, dims: list[Dimension]):
    """The Optuna sampler ``tune.search`` names, seeded with ``tune.seed``."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    s = optuna.samplers
    startup = startup_trials(t)
    if t.search == "random":
        return s.RandomSampler(seed=t.seed)
    if t.search == "grid":
        return s.GridSampler({d.name: optuna_choices(d) for d in dims}, seed=t.seed)
    if t.search == "cmaes":
        return s.CmaEsSampler(
            seed=t.seed, n_startup_trials=startup, warn_independent_sampling=False
        )
    if t.search == "gp":
        return s.GPSampler(seed=t.seed, n_startup_trials=startup, warn_independent_sampling=False)
    # Multivariate TPE models the parameters jointly; group=True keeps the branches of a
    # conditional space apart; the constant liar spreads concurrent trials.
    return s.TPESampler(
        seed=t.seed,
        n_startup_trials=startup,
        multivariate=True,
        group=True,
        constant_liar=True,
    )


def study_of(
    dims: list[Dimension], mode: str, points: list[tuple[dict[str, Any], float]], storage=None
):
    """An Optuna study holding finished trials: (searcher values, result) pairs whose values
    lie in the space. Warm starts seed the searcher's storage with it; plots read it."""
    import optuna
    from optuna.trial import create_trial

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    by_name = {d.name: d for d in dims}
    study = optuna.create_study(
        storage=storage,
        study_name="optuna",  # the name Ray's OptunaSearch opens
        direction="maximize" if mode == "max" else "minimize",
        load_if_exists=True,
    )
    for params, value in points:
        if not params or not all(
            n in by_name and by_name[n].contains(config_value(by_name[n], v))
            for n, v in params.items()
        ):
            continue
        distributions = {n: distribution(by_name[n]) for n in params}
        study.add_trial(create_trial(params=params, distributions=distributions, value=value))
    return study


def first_point(cfg: ExperimentConfig, dims: list[Dimension]) -> dict[str, Any]:
    point = config_point(dims, cfg.model_dump(mode="json"))
    return {name: optuna_value(value) for name, value in point.items()}
