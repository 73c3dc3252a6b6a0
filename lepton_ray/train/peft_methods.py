"""Every ``peft.method``: the ``peft`` library config it builds, what a model type supports,
LoRA+'s learning-rate ratio and AdaLoRA's rank-budget technique.

``train/peft.py`` applies the adapter and resolves target modules against the real model;
this module turns a ``PeftSection`` into ``peft`` objects, one small builder per method.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from lepton_ray.config.peft import MERGEABLE
from lepton_ray.errors import ConfigError
from lepton_ray.train.peft_targets import ATTENTION_PARENTS, linear_layers, resolve_targets
from lepton_ray.train.techniques import RunningMean, Technique

if TYPE_CHECKING:
    from lepton_ray.config import PeftSection

ADALORA_PLACEHOLDER_STEPS = 1_000_000
"""AdaLoRA's ``total_step`` where the run's own is not known (the preflight build, the FSDP
export copy, ``validate``): only the training workers step its schedule."""


def mergeable(method: str) -> bool:
    """Whether a ``method``'s adapter folds into the base weights (``merge_and_unload``)."""
    return method in MERGEABLE or method == "none"


def build_peft_config(
    model,
    cfg: PeftSection,
    task_type: str,
    heads: tuple[str, ...] = (),
    total_steps: int | None = None,
    tokenizer_path: str | None = None,
):
    """The ``peft`` config of ``cfg.method`` for ``model`` (targets resolved against it).

    ``task_type``: the ``peft.TaskType`` member name; ``heads``: the task's output layers,
    left out of the ``all-linear`` preset; ``total_steps``: AdaLoRA's optimizer steps;
    ``tokenizer_path``: the tokenizer a text-initialised prompt is encoded with.
    """
    from peft import TaskType

    kind = TaskType[task_type]
    method = cfg.method
    check_method_supported(model, method, task_type)
    if method == "lora":
        from peft import LoraConfig

        c = cfg.lora
        return LoraConfig(
            task_type=kind,
            r=c.r,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=resolve_targets(model, c.target_modules, heads),
            bias=c.bias,
            use_dora=c.use_dora,
            use_rslora=c.use_rslora,
        )
    if method == "adalora":
        from peft import AdaLoraConfig

        c = cfg.adalora
        steps = total_steps or ADALORA_PLACEHOLDER_STEPS
        check_adalora_schedule(cfg, steps)
        return AdaLoraConfig(
            task_type=kind,
            init_r=c.init_r,
            target_r=c.target_r,
            tinit=c.tinit,
            tfinal=c.tfinal,
            deltaT=c.deltaT,
            beta1=c.beta1,
            beta2=c.beta2,
            orth_reg_weight=c.orth_reg_weight,
            total_step=steps,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=resolve_targets(
                model, c.target_modules, heads, key="peft.adalora.target_modules"
            ),
        )
    if method == "ia3":
        from peft import IA3Config

        targets, feedforward = ia3_targets(model, cfg, heads)
        return IA3Config(task_type=kind, target_modules=targets, feedforward_modules=feedforward)
    if method == "prefix":
        from peft import PrefixTuningConfig

        c = cfg.prefix
        return PrefixTuningConfig(
            task_type=kind,
            num_virtual_tokens=c.num_virtual_tokens,
            prefix_projection=c.prefix_projection,
            encoder_hidden_size=c.encoder_hidden_size or model.config.hidden_size,
        )
    if method == "prompt":
        from peft import PromptTuningConfig

        c = cfg.prompt
        init = c.prompt_tuning_init.upper()
        return PromptTuningConfig(
            task_type=kind,
            num_virtual_tokens=c.num_virtual_tokens,
            prompt_tuning_init=init,
            prompt_tuning_init_text=c.init_text if init == "TEXT" else None,
            tokenizer_name_or_path=tokenizer_path if init == "TEXT" else None,
        )
    raise ConfigError(f"peft.method: '{method}' builds no adapter")


def after_wrapping(peft_model, method: str) -> None:
    """Settle what only matters at creation, so a saved adapter loads anywhere: a prompt
    started from a text's embeddings is recorded as random (its trained values are in the
    weights; loading would otherwise read the tokenizer from a path of this machine)."""
    if method == "prompt":
        from peft import PromptTuningInit

        for config in peft_model.peft_config.values():
            config.prompt_tuning_init = PromptTuningInit.RANDOM
            config.prompt_tuning_init_text = None
            config.tokenizer_name_or_path = None


def check_method_supported(model, method: str, task_type: str, model_name: str = "") -> None:
    """Refuse a method the model type cannot run, naming ``peft.method`` and ``model.name``."""
    if method != "prefix":
        return
    # peft hands prefix tuning's keys and values to the model as past_key_values: a causal LM
    # takes them (as its cache); for other task types peft looks for that parameter name in
    # the model's forward, which transformers 5 calls `cache` (so BERT-style classifiers fail).
    names = _forward_parameters(model)
    if task_type != "CAUSAL_LM":
        backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
        names |= _forward_parameters(backbone) if backbone is not None else set()
        ok = "past_key_values" in names
    else:
        ok = bool({"past_key_values", "cache"} & names)
    if not ok:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(
            f"peft.method=prefix is not supported by model.name{'=' + model_name if model_name else ''}"
            f" (type '{model_type}', {type(model).__name__}): peft passes the prefix as past_key_values, which its "
            "forward does not take; use peft.method prompt, lora or ia3"
        )


def _forward_parameters(module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def ia3_targets(model, cfg: PeftSection, heads: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """IA3's target and feed-forward modules as full module paths of ``model``."""
    c = cfg.ia3
    key = "peft.ia3.target_modules"
    auto = c.target_modules == "auto"
    if auto:
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        )
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
        )

        model_type = getattr(model.config, "model_type", None)
        if model_type not in TARGETS:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in linear_layers(model)})
            raise ConfigError(
                f"{key}: auto has no default for model type '{model_type}'; list the layers "
                f"to rescale (its Linear layers are {leaves}) or use a preset"
            )
        targets = _matching(model, TARGETS[model_type])
        if not targets:
            raise ConfigError(f"{key}: peft's default {TARGETS[model_type]} matches no layer")
        names = c.feedforward_modules
        feedforward_names = FEEDFORWARD.get(model_type, []) if names == "auto" else names
    else:
        targets = _matching(model, resolve_targets(model, c.target_modules, heads, key=key))
        feedforward_names = c.feedforward_modules
    if feedforward_names == "auto":  # the targets outside every attention block
        feedforward = [
            n
            for n in targets
            if not any(p in part.lower() for part in n.split(".")[:-1] for p in ATTENTION_PARENTS)
        ]
    else:
        missing = [f for f in feedforward_names if not _matching_names(targets, [f])]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in targets})
            raise ConfigError(
                f"peft.ia3.feedforward_modules: {missing} are not among {key} "
                f"(its layers are {leaves})"
            )
        feedforward = _matching_names(targets, list(feedforward_names))
    return targets, feedforward


def _matching_names(names, suffixes: list[str]) -> list[str]:
    return sorted(n for n in names if any(n == s or n.endswith("." + s) for s in suffixes))


def _matching(model, suffixes: list[str]) -> list[str]:
    """Full paths of the Linear layers named by ``suffixes`` (a name or a dotted tail)."""
    return _matching_names([n for n, _ in linear_layers(model)], suffixes)


def check_adalora_schedule(cfg: PeftSection, total_steps: int) -> None:
    """AdaLoRA needs a budgeting phase between its ``tinit`` and ``tfinal`` steps."""
    c = cfg.adalora
    if c.tinit + c.tfinal >= total_steps:
        raise ConfigError(
            f"peft.adalora.tinit {c.tinit} + peft.adalora.tfinal {c.tfinal} leave no step of "
            f"the run's {total_steps} optimizer steps (train.epochs x steps per epoch) to "
            "shrink the rank budget in; lower them or train longer"
        )


def loraplus_ratio(cfg: PeftSection) -> float | None:
    """LoRA+'s learning-rate ratio of the B matrices, where the method reads it."""
    return cfg.lora.loraplus_lr_ratio if cfg.method == "lora" else None


class AdaLoraBudget(Technique):
    """AdaLoRA inside the loop: after every optimizer step (gradients still there) the rank
    budget is re-allocated by importance (``update_and_allocate``), and the orthogonality
    penalty on P and Q is added to the task's loss.

    peft adds that penalty in its own forward only to ``outputs.loss``, which exists when
    labels reach the model (a classifier here, never the causal LM, whose loss is the
    task's); so the adapter's ``orth_reg_weight`` is set to 0 in the live model and this
    technique adds the term for every task alike (the saved adapter config reads 0).
    """

    name = "adalora"

    def __init__(self, peft_model):
        config = peft_model.peft_config[peft_model.active_adapter]
        self.weight = float(config.orth_reg_weight)
        config.orth_reg_weight = 0.0
        self.adapter = peft_model.active_adapter
        self.total_step = config.total_step
        self.penalty = RunningMean()
        self.model = None

    def loss(self, model, batch, inputs, outputs, loss):
        if not self.weight:
            return loss
        term = orthogonality_penalty(model, self.adapter)
        self.penalty.add(float(term.detach()))
        return loss + self.weight * term.to(loss.dtype)

    def after_step(self, model, step: int) -> None:
        from lepton_ray.train.parallel import unwrap

        peft_model = unwrap(model)
        config = peft_model.peft_config[self.adapter]
        if step > config.total_step - config.tfinal and config.rank_pattern is None:
            # Resumed in the final phase: the allocation lives on in the zeroed singular
            # values of the restored weights (the importance averages are not checkpointed).
            config.rank_pattern = {
                n: (p != 0).view(-1).tolist()
                for n, p in peft_model.base_model.model.named_parameters()
                if f"lora_E.{self.adapter}" in n
            }
        with torch.no_grad():
            peft_model.base_model.update_and_allocate(step)
        self.model = model

    def metrics(self) -> dict[str, float]:
        found: dict[str, float] = {}
        if self.penalty.count:
            found["adalora_orth_reg"] = self.penalty.value()
        if self.model is not None:  # the budget as it stands: the curve MLflow shows falling
            found["adalora_total_rank"] = float(sum(adalora_ranks(self.model).values()))
        return found

    def reset(self) -> None:
        self.penalty.reset()


def orthogonality_penalty(model, adapter: str = "default") -> torch.Tensor:
    """AdaLoRA's regulariser: the mean Frobenius distance of P P^T and Q^T Q from I."""
    terms = []
    for name, p in model.named_parameters():
        if f".{adapter}" not in name or not p.requires_grad:
            continue
        if ".lora_A." in name:
            cov = p @ p.T
        elif ".lora_B." in name:
            cov = p.T @ p
        else:
            continue
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        terms.append(torch.linalg.matrix_norm(cov - eye))
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(terms).mean()


def adalora_ranks(model) -> dict[str, int]:
    """Each adapted layer's rank as AdaLoRA last allocated it (its ``rank_pattern``; every
    layer at ``init_r`` before the first allocation), by the name of its singular values."""
    from lepton_ray.train.parallel import unwrap

    peft_model = unwrap(model)
    config = peft_model.peft_config[peft_model.active_adapter]
    # Keys name the singular values, with or without the adapter (saving drops it).
    pattern = {k.split(".lora_E")[0]: v for k, v in (config.rank_pattern or {}).items()}
    ranks = {}
    for name, p in peft_model.named_parameters():
        if ".lora_E." not in name:
            continue
        layer = name.split(".lora_E")[0]
        key = next((k for k in pattern if layer == k or layer.endswith("." + k)), None)
        ranks[name] = int(sum(pattern[key])) if key else int(p.shape[0])
    return ranks


def build_peft_techniques(cfg, model) -> list[Technique]:
    """The techniques ``peft.method`` needs in the loop (AdaLoRA's budget), for the
    (wrapped) ``model``."""
    if cfg.peft.method != "adalora":
        return []
    from lepton_ray.train.parallel import unwrap

    return [AdaLoraBudget(unwrap(model))]


__all__ = [
    "AdaLoraBudget",
    "adalora_ranks",
    "after_wrapping",
    "build_peft_config",
    "build_peft_techniques",
    "check_adalora_schedule",
    "check_method_supported",
    "ia3_targets",
    "loraplus_ratio",
    "mergeable",
    "orthogonality_penalty",
]
