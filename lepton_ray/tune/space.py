"""The YAML search space (dotted config keys) as Tune distributions."""

from __future__ import annotations

from typing import Any

from lepton_ray.config import ExperimentConfig, SearchParam


def build_param_space(space: dict[str, SearchParam]) -> dict[str, Any]:
    """``{"train.lr": tune.loguniform(...)}``; OptunaSearch turns these into its own."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, param in space.items():
        if param.type == "uniform":
            out[key] = tune.uniform(param.low, param.high)
        elif param.type == "loguniform":
            out[key] = tune.loguniform(param.low, param.high)
        elif param.type == "int":
            out[key] = tune.randint(int(param.low), int(param.high) + 1)
        else:
            out[key] = tune.choice(list(param.values))
    return out


def config_point(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config's own values of the swept keys: the first trial runs them (a baseline)."""
    raw = cfg.model_dump(mode="json")
    point = {}
    for key, param in cfg.tune.space.items():
        node: Any = raw
        for part in key.split("."):
            node = node[part]
        if param.type == "choice" and node not in param.values:
            continue  # the config's value is not in the space; let Optuna pick
        if param.type != "choice" and not (param.low <= node <= param.high):
            continue
        point[key] = node
    return point if len(point) == len(cfg.tune.space) else {}
