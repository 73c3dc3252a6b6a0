"""The ``peft`` section: parameter-efficient fine-tuning.

``peft.method`` picks the technique; each reads its own sibling section, named after the
``peft`` config it builds: ``peft.lora`` = ``peft.LoraConfig`` (with DoRA, rsLoRA and LoRA+
as options), ``peft.adalora`` = ``peft.AdaLoraConfig``, ``peft.ia3`` = ``peft.IA3Config``,
``peft.prefix`` = ``peft.PrefixTuningConfig``, ``peft.prompt`` = ``peft.PromptTuningConfig``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from lepton_ray.config.base import Section

if TYPE_CHECKING:
    from lepton_ray.config.experiment import ExperimentConfig

Targets = list[str] | Literal["attention", "all-linear"]
TARGETS_HELP = (
    "Layer names to adapt, or a preset resolved against the real model: attention (the "
    "attention block's Linear layers) or all-linear (every Linear layer but the output head)."
)


class LoraSection(Section):
    """Fields of ``peft.LoraConfig``."""

    r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: Targets = Field(
        default_factory=lambda: ["query", "value"], description=TARGETS_HELP
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = Field(
        False,
        description="DoRA: split each adapted weight into magnitude and direction, LoRA on "
        "the direction (a little slower per step).",
    )
    use_rslora: bool = Field(
        False, description="rsLoRA: scale by lora_alpha / sqrt(r) instead of lora_alpha / r."
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        ge=1.0,
        description="LoRA+: the B matrices learn at train.lr times this (e.g. 16); unset: "
        "every weight at train.lr.",
    )


class AdaLoraSection(Section):
    """Fields of ``peft.AdaLoraConfig``: LoRA whose rank budget is re-allocated by importance
    while training (``total_step`` is the run's real number of optimizer steps)."""

    init_r: int = Field(12, ge=1, le=512, description="Rank of every adapted layer at the start.")
    target_r: int = Field(
        8, ge=1, le=512, description="Average rank per layer the budget shrinks to."
    )
    tinit: int = Field(0, ge=0, description="Optimizer steps before the budget starts to shrink.")
    tfinal: int = Field(
        0, ge=0, description="Last optimizer steps trained at the final budget (ranks fixed)."
    )
    deltaT: int = Field(1, ge=1, description="Optimizer steps between two budget allocations.")
    beta1: float = Field(0.85, gt=0.0, lt=1.0, description="EMA factor of the sensitivity.")
    beta2: float = Field(0.85, gt=0.0, lt=1.0, description="EMA factor of its uncertainty.")
    orth_reg_weight: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the orthogonality penalty on P and Q in the loss. peft's default "
        "0.5 (and 0.1 too) kept MiniLM at chance on SST-2 over 120 steps, where 0 reached 0.78 "
        "(benchmarks/RESULTS.md); the paper's runs are thousands of steps long.",
    )
    lora_alpha: int = Field(32, ge=1, description="Scaling numerator (scale = alpha / rank).")
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: Targets = Field(
        default_factory=lambda: ["query", "value"], description=TARGETS_HELP
    )

    @model_validator(mode="after")
    def _budget_shrinks(self) -> AdaLoraSection:
        if self.target_r > self.init_r:
            raise ValueError(
                f"peft.adalora.target_r {self.target_r} is above peft.adalora.init_r "
                f"{self.init_r}; the budget only shrinks"
            )
        return self


class IA3Section(Section):
    """Fields of ``peft.IA3Config``: learned vectors that rescale activations."""

    target_modules: Targets | Literal["auto"] = Field(
        "auto",
        description="Layers whose activations are rescaled: auto (peft's choice for the "
        "model type: keys, values and the feed-forward output layer) or as for LoRA. "
        + TARGETS_HELP,
    )
    feedforward_modules: list[str] | Literal["auto"] = Field(
        "auto",
        description="Targets rescaled on their input rather than their output (feed-forward "
        "layers); each must be one of target_modules. auto: peft's choice with "
        "target_modules auto, else the targets outside the attention blocks.",
    )


class PrefixSection(Section):
    """Fields of ``peft.PrefixTuningConfig``: learned keys and values before every layer's
    attention (models that take a key/value cache: causal LMs, not BERT classifiers)."""

    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Prefix length in tokens.")
    prefix_projection: bool = Field(
        False, description="Reparameterise the prefix through a two-layer MLP while training."
    )
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="Hidden size of that MLP (default: the model's hidden size)."
    )


class PromptSection(Section):
    """Fields of ``peft.PromptTuningConfig``: learned input embeddings before the text."""

    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Soft prompt length in tokens.")
    prompt_tuning_init: Literal["random", "text", "sample_vocab"] = Field(
        "random",
        description="Start from random vectors, from the embeddings of init_text, or from "
        "embeddings of random vocabulary tokens.",
    )
    init_text: str | None = Field(
        None, description="Text whose token embeddings start the prompt (prompt_tuning_init: text)."
    )

    @model_validator(mode="after")
    def _text_for_text_init(self) -> PromptSection:
        if self.prompt_tuning_init == "text" and not self.init_text:
            raise ValueError("peft.prompt.prompt_tuning_init text needs peft.prompt.init_text")
        return self


METHOD_SECTIONS = {
    "lora": "lora",
    "adalora": "adalora",
    "ia3": "ia3",
    "prefix": "prefix",
    "prompt": "prompt",
}
"""The section each method reads (``none`` reads none)."""
MERGEABLE = ("lora", "adalora", "ia3")
"""Methods whose adapter folds into the base weights (``merge_and_unload``); prefix and
prompt tuning add virtual tokens, so their artifacts load as a ``PeftModel``."""
VIRTUAL_TOKENS = ("prefix", "prompt")


class PeftSection(Section):
    method: Literal["none", "lora", "adalora", "ia3", "prefix", "prompt"] = Field(
        "lora",
        description="'none' fine-tunes every weight; the others train an adapter configured "
        "in the section of the same name (peft.lora, peft.adalora, ...).",
    )
    lora: LoraSection = Field(default_factory=LoraSection)
    adalora: AdaLoraSection = Field(default_factory=AdaLoraSection)
    ia3: IA3Section = Field(default_factory=IA3Section)
    prefix: PrefixSection = Field(default_factory=PrefixSection)
    prompt: PromptSection = Field(default_factory=PromptSection)

    def unused_keys(self) -> set[str]:
        """Dotted keys whose settings this method never reads (every section but its own):
        left out of a run's logged params, which say what trained it."""
        own = METHOD_SECTIONS.get(self.method)
        return {f"peft.{name}" for name in METHOD_SECTIONS.values() if name != own}


def peft_problems(cfg: ExperimentConfig) -> list[str]:
    """Combinations of ``peft.method`` with other sections that cannot train correctly,
    each naming both keys. (Model types are checked against the built model:
    ``train.peft_methods.check_method_supported``.)"""
    from lepton_ray.tasks import get_task

    method = cfg.peft.method
    problems = []
    if method in VIRTUAL_TOKENS:
        if method not in get_task(cfg.task).peft_virtual_token_methods:
            problems.append(
                f"peft.method={method} is not supported with task={cfg.task}: the virtual "
                "tokens would shift the outputs its loss, evaluation and serving read"
            )
        if cfg.data.packing:
            problems.append(
                f"peft.method={method} with data.packing=true: packed rows carry a "
                "block-causal mask and per-example positions that virtual tokens break; set "
                "data.packing: false"
            )
        if cfg.compress.enabled:
            problems.append(
                f"peft.method={method} with compress.enabled=true: its virtual tokens cannot "
                "be merged into the base weights that compression quantizes; set "
                "compress.enabled: false"
            )
        if cfg.serve.enabled and get_task(cfg.task).serving == "generate":
            problems.append(
                f"peft.method={method} with serve.enabled=true: the generation engines (hf "
                "and vllm) run a plain model with their own KV cache, which has no room for "
                "virtual tokens; set serve.enabled: false"
            )
        if cfg.tune.objective == "served":
            problems.append(
                f"peft.method={method} with tune.objective=served: a served trial is "
                "compressed, which needs a mergeable adapter; use tune.objective: validation"
            )
    if method in (*VIRTUAL_TOKENS, "adalora") and cfg.train.strategy == "fsdp":
        problems.append(
            f"peft.method={method} with train.strategy=fsdp is not supported (sharded "
            "weights); use train.strategy: ddp"
        )
    return problems
