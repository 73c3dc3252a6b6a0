"""PEFT adapters from the ``peft`` config section."""

from __future__ import annotations

from lepton_ray.config import PeftSection
from lepton_ray.tasks import get_task


def apply_peft(model, cfg: PeftSection, task: str):
    """Wrap ``model`` in a PEFT adapter of the task's type (a classifier's head stays fully
    trainable)."""
    if cfg.method == "none":
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    targets = resolve_targets(model, cfg.lora.target_modules, get_task(task).keep_float)
    lora = LoraConfig(
        task_type=TaskType[get_task(task).peft_task_type],
        r=cfg.lora.r,
        lora_alpha=cfg.lora.lora_alpha,
        lora_dropout=cfg.lora.lora_dropout,
        target_modules=targets,
        bias=cfg.lora.bias,
    )
    return get_peft_model(model, lora)


def parameter_counts(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}


ATTENTION_PARENTS = ("attn", "attention")
"""A Linear layer belongs to the attention block when a module on its path is named so."""


def resolve_targets(model, targets: list[str] | str, heads: tuple[str, ...] = ()) -> list[str]:
    """The layer names LoRA adapts: a list as given (each must name a layer of the model), or
    a preset resolved against the model's own Linear layers, as full module paths (so a
    name shared by attention and MLP layers, BERT's ``dense``, adapts only the chosen ones):
    ``attention`` (those inside an attention block) or ``all-linear`` (all but the task's
    output ``heads``, e.g. lm_head or classifier)."""
    import torch

    from lepton_ray.errors import ConfigError

    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    leaves = {n.rsplit(".", 1)[-1] for n, _ in linear}
    if isinstance(targets, str):
        if targets == "attention":
            chosen = {
                n
                for n, _ in linear
                if any(p in part.lower() for part in n.split(".")[:-1] for p in ATTENTION_PARENTS)
            }
        else:
            chosen = {
                n
                for n, _ in linear
                if not any(n == h or n.startswith(h + ".") or n.endswith("." + h) for h in heads)
            }
        if not chosen:
            raise ConfigError(
                f"peft.lora.target_modules: the preset '{targets}' matches no layer of the "
                f"model; its Linear layers are {sorted(leaves)}"
            )
        return sorted(chosen)
    _check_targets(model, list(targets))
    return list(targets)


def _check_targets(model, targets: list[str]) -> None:
    """Every LoRA target must name a layer of the model, or the config is wrong."""
    import torch

    from lepton_ray.errors import ConfigError

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    linear = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(
            f"peft.lora.target_modules: {missing} name no layer of the model; "
            f"its Linear layers are {sorted(linear)}"
        )


def check_targets_early(cfg) -> None:
    """``peft.lora.target_modules`` resolved against the model's layers, built on the meta
    device from ``model.name``'s config.json (no weights, no download, no conversion), so that
    ``validate`` refuses a target that matches nothing. Where that file cannot be read
    without a download, or the model comes from ``model.init_from``, the train stage's
    preflight checks instead (it builds the real model)."""
    if cfg.peft.method == "none" or cfg.model.init_from:
        return
    import torch
    import transformers

    from lepton_ray.config.model import config_json
    from lepton_ray.errors import ConfigError

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
    resolve_targets(model, cfg.peft.lora.target_modules, task.keep_float)
