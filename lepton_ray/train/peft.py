"""PEFT adapters from the ``peft`` config section."""

from __future__ import annotations

from lepton_ray.config import PeftSection
from lepton_ray.tasks import get_task
from lepton_ray.train.peft_targets import ATTENTION_PARENTS, linear_layers, resolve_targets


def apply_peft(
    model,
    cfg: PeftSection,
    task: str,
    total_steps: int | None = None,
    tokenizer_path: str | None = None,
):
    """Wrap ``model`` in the PEFT adapter of ``cfg.method``, of the task's type (a
    classifier's head stays fully trainable). ``total_steps``: the run's optimizer steps
    (AdaLoRA's schedule); ``tokenizer_path``: encodes a prompt started from text."""
    if cfg.method == "none":
        return model
    from peft import get_peft_model

    from lepton_ray.train.peft_methods import after_wrapping, build_peft_config

    spec = get_task(task)
    config = build_peft_config(
        model, cfg, spec.peft_task_type, spec.keep_float, total_steps, tokenizer_path
    )
    wrapped = get_peft_model(model, config)
    after_wrapping(wrapped, cfg.method)
    return wrapped


def parameter_counts(model) -> dict[str, float]:
    """Total and trainable weights, and the trainable share of the total (0 to 1)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "params_total": total,
        "params_trainable": trainable,
        "params_trainable_share": trainable / total if total else 0.0,
    }


def check_targets_early(cfg) -> None:
    """The PEFT method(s) resolved against the model's layers, built on the meta device from
    ``model.name``'s config.json (no weights, no download, no conversion), so that
    ``validate`` refuses a target that matches nothing, or a method the model type does not
    support; a sweep's every searched ``peft.method`` is checked. Where that file cannot be
    read without a download, or the model comes from ``model.init_from``, the train stage's
    preflight checks instead (it builds the real model)."""
    methods = searched_methods(cfg)
    if methods <= {"none"} or cfg.model.init_from:
        return
    import torch
    import transformers

    from lepton_ray.config.model import config_json
    from lepton_ray.errors import ConfigError
    from lepton_ray.train.peft_methods import build_peft_config, check_method_supported

    hf = config_json(cfg.model.name)
    if hf is None or "model_type" not in hf:
        return
    hf = {**hf, **cfg.model.config_overrides}
    task = get_task(cfg.task)
    try:
        config = transformers.AutoConfig.for_model(**hf)
        with torch.device("meta"):
            model = task.load_class().from_config(config)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"model {cfg.model.name}: its config cannot build a model: {err}"
        ) from None
    for method in sorted(methods - {"none"}):
        check_method_supported(model, method, task.peft_task_type, cfg.model.name)
        peft = cfg.peft.model_copy(update={"method": method})
        build_peft_config(model, peft, task.peft_task_type, task.keep_float)


def searched_methods(cfg) -> set[str]:
    """``peft.method`` and every value a sweep searches for it."""
    methods = {cfg.peft.method}
    space = cfg.tune.space.get("peft.method") if cfg.tune.enabled else None
    for param in space if isinstance(space, list) else [space] if space else []:
        methods |= {v for v in (param.values or []) if isinstance(v, str)}
    return methods


__all__ = [
    "ATTENTION_PARENTS",
    "apply_peft",
    "check_targets_early",
    "linear_layers",
    "parameter_counts",
    "resolve_targets",
    "searched_methods",
]
