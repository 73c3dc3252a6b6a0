"""The ``peft`` section: parameter-efficient fine-tuning (``peft.lora`` = ``peft.LoraConfig``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lepton_ray.config.base import Section


class LoraSection(Section):
    """Fields of ``peft.LoraConfig``."""

    r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["attention", "all-linear"] = Field(
        default_factory=lambda: ["query", "value"],
        description="Layer names to adapt, or a preset resolved against the real model: "
        "attention (the attention block's Linear layers) or all-linear (every Linear layer "
        "but the output head).",
    )
    bias: Literal["none", "all", "lora_only"] = "none"


class PeftSection(Section):
    method: Literal["none", "lora"] = Field("lora", description="'none' fine-tunes every weight.")
    lora: LoraSection = Field(default_factory=LoraSection)

    def unused_keys(self) -> set[str]:
        """Dotted keys whose settings this method never reads (``peft.lora`` under full
        fine-tuning): left out of a run's logged params, which say what trained it."""
        return set() if self.method == "lora" else {"peft.lora"}
