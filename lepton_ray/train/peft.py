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

    _check_targets(model, list(cfg.lora.target_modules))
    lora = LoraConfig(
        task_type=TaskType[get_task(task).peft_task_type],
        r=cfg.lora.r,
        lora_alpha=cfg.lora.lora_alpha,
        lora_dropout=cfg.lora.lora_dropout,
        target_modules=list(cfg.lora.target_modules),
        bias=cfg.lora.bias,
    )
    return get_peft_model(model, lora)


def parameter_counts(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}


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
