"""The ``train`` section (optimiser, schedule, precision, checkpoints, early stopping) and
the ``scaling`` section (``ray.train.ScalingConfig``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lepton_ray.config.base import Section
from lepton_ray.config.chat import GenerationEvalSection
from lepton_ray.config.distill import DistillSection
from lepton_ray.config.regularization import AdversarialSection


class EarlyStoppingSection(Section):
    """Stop when the metric that picks the best checkpoint (``tune.metric``) stops improving."""

    patience: int | None = Field(
        None, ge=1, description="Evaluations without improvement before stopping; null: never."
    )
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as better.")


class TrainConfig(Section):
    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, description="Examples per worker per forward pass.")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Examples per optimizer step over all workers; if set it must equal "
        "batch_size x num_workers x gradient_accumulation_steps (batch_size is derived "
        "from it when left at its default).",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Forward/backward passes per optimizer step."
    )
    eval_batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-4, gt=0.0, lt=1.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(
        0.01, ge=0.0, description="AdamW weight decay (never on biases or LayerNorm weights)."
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="Learning rate after warm-up: constant, linear or cosine decay."
    )
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of steps warming up.")
    max_grad_norm: float | None = Field(
        1.0, gt=0.0, description="Clip the gradient norm to this; null: no clipping."
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Label smoothing of the training loss (classes; a language model's "
        "next tokens over its vocabulary); the reported val_loss stays unsmoothed.",
    )
    adversarial: AdversarialSection = Field(
        default_factory=AdversarialSection,
        description="Adversarial training on the input embeddings (FGM, PGD).",
    )
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap steps (smoke runs).")
    eval_every_steps: int | None = Field(
        None,
        ge=1,
        description="Evaluate (and checkpoint) every N optimizer steps; null: every epoch. "
        "The end of an epoch is always evaluated.",
    )
    log_every_steps: int = Field(
        10, ge=1, description="Log train loss and learning rate to MLflow every N steps."
    )
    early_stopping: EarlyStoppingSection = Field(default_factory=EarlyStoppingSection)
    group_by_length: bool = Field(
        True,
        description="Batch texts of similar token length together (less padding); the "
        "batches' order stays random.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: DistributedDataParallel (a full copy per worker); fsdp: FSDP2 "
        "fully_shard per transformer layer (weights, gradients and optimizer state sharded).",
    )
    fsdp_min_params_per_worker: int = Field(
        100_000,
        ge=1,
        description="FSDP refuses a model whose parameters per worker fall below this "
        "(too small to shard; use ddp).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast where the CPU has native bf16 (AVX512-BF16/AMX) or "
        "the GPU supports it, fp16 + grad scaler on older GPUs, else fp32.",
    )
    seed: int = 42
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads per worker; default = CPUs per worker."
    )
    keep_checkpoints: int = Field(
        1, ge=1, description="Best checkpoints kept (by tune.metric); the latest is kept too."
    )
    max_failures: int = Field(
        1,
        ge=-1,
        description="Worker failures Ray Train recovers from (from the latest checkpoint); "
        "-1: no limit.",
    )
    resume_from: str | None = Field(
        None, description="A checkpoint folder to start from (weights, optimizer, step)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, slower)."
    )
    generation: GenerationEvalSection = Field(
        default_factory=GenerationEvalSection,
        description="task causal_lm: greedy generation on validation prompts at every "
        "evaluation, scored and logged to MLflow as a table.",
    )
    distill: DistillSection | None = Field(
        None, description="Knowledge distillation from a teacher model; null: off."
    )

    @model_validator(mode="after")
    def _adversarial_fits_the_strategy(self) -> TrainConfig:
        # PGD's inner steps freeze the weights for a backward pass that only wants the
        # embeddings' gradient; FSDP2's hooks expect the gradients they shard.
        if self.adversarial.method == "pgd" and self.strategy == "fsdp":
            raise ValueError(
                "train.adversarial.method pgd does not run under train.strategy fsdp; "
                "use train.adversarial.method: fgm, or train.strategy: ddp"
            )
        return self


class ScalingSection(Section):
    """Fields of ``ray.train.ScalingConfig``."""

    num_workers: int = Field(2, ge=1, description="Training workers (processes).")
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How the workers' placement group packs them onto nodes."
    )
