"""The ``compress`` section: how the trained model is quantized for serving, and how much
worse than the uncompressed model it may score."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lepton_ray.config.base import Section


class PruneSection(Section):
    """Magnitude pruning of the float model, before it is quantized (``compress.method``)."""

    sparsity: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of the pruned weights set to zero (global unstructured magnitude "
        "pruning: the smallest |w| over all of them together). Zeros are stored as zeros: "
        "a dense file is no smaller and dense kernels no faster.",
    )
    targets: list[str] | None = Field(
        None,
        description="Linear modules pruned unstructured (names or name prefixes, e.g. "
        "classifier); null: every Linear inside the transformer layers (attention and MLP), "
        "never the embeddings, norms, pooler or output head.",
    )
    heads: int = Field(
        0,
        ge=0,
        description="Attention heads removed from every layer, lowest L2 norm of their "
        "query/key/value rows and output columns first (bert and llama models). The "
        "projections get smaller. With grouped-query attention heads go by whole "
        "key/value groups, so this must be a multiple of the group size.",
    )
    recovery_steps: int = Field(
        0,
        ge=0,
        description="Optimizer steps (AdamW, train.batch_size rows each) of fine-tuning on "
        "the training split after pruning; pruned weights stay zero.",
    )
    recovery_lr: float | None = Field(
        None, gt=0.0, lt=1.0, description="Learning rate of the recovery steps; null: train.lr."
    )

    @model_validator(mode="after")
    def _does_something(self) -> PruneSection:
        if self.sparsity == 0.0 and self.heads == 0:
            raise ValueError(
                "compress.prune sets neither sparsity nor heads; set one, or "
                "compress.prune: null to prune nothing"
            )
        return self


def prune_problem(cfg) -> str | None:
    """Why ``compress.prune`` cannot run on the experiment's model (None: it can, or the
    model's config.json cannot be read here; the compress stage then checks the model)."""
    from lepton_ray.config.model import config_json

    prune = cfg.compress.prune
    if prune is None:
        if cfg.compress.method == "fp32":
            return (
                "compress.method fp32 stores the float model as it is; it is meant for a "
                "pruned one: set compress.prune, or choose another compress.method"
            )
        return None
    if cfg.compress.method == "none":
        return (
            "compress.prune runs in the compress stage, which compress.method none skips; "
            "use compress.method fp32 to keep the pruned model in float32"
        )
    if prune.heads == 0:
        return None
    from lepton_ray.heads import HEAD_MODEL_TYPES

    hf = config_json(cfg.model.name)
    if hf is None:
        return None
    hf = {**hf, **cfg.model.config_overrides}
    kind = hf.get("model_type")
    if kind not in HEAD_MODEL_TYPES:
        return (
            f"compress.prune.heads: model.name '{cfg.model.name}' is a {kind} model; heads "
            f"can be removed from {' and '.join(HEAD_MODEL_TYPES)} models only (set "
            "compress.prune.heads: 0; unstructured compress.prune.sparsity works on any model)"
        )
    heads = int(hf.get("num_attention_heads") or 0)
    group = heads // int(hf.get("num_key_value_heads") or heads)
    if prune.heads >= heads:
        return (
            f"compress.prune.heads {prune.heads} would remove every attention head of each "
            f"layer of model.name '{cfg.model.name}' ({heads} per layer); remove at most "
            f"{heads - group}"
        )
    if prune.heads % group:
        return (
            f"compress.prune.heads {prune.heads}: model.name '{cfg.model.name}' groups "
            f"{group} query heads per key/value head, and heads are removed by whole groups; "
            f"use a multiple of {group}"
        )
    return None


class CompressSection(Section):
    enabled: bool = True
    method: Literal[
        "auto",
        "dynamic_int8",
        "onnx_int8",
        "bf16",
        "int8_weight_only",
        "int4_weight_only",
        "fp32",
        "none",
    ] = Field(
        "auto",
        description="auto: chosen from the hardware (CPU: bf16 weights where it has AMX, else "
        "dynamic_int8; GPU: int8_weight_only). dynamic_int8: torch int8 Linear layers, "
        "activations quantized per batch. onnx_int8: ONNX Runtime graph with int8 weights. "
        "bf16: bfloat16 weights. int8_weight_only / int4_weight_only: torchao, GPU only. "
        "fp32: float32 weights as they are (a pruned model, compress.prune, unquantized). "
        "none: no compression.",
    )
    target: Literal["cpu", "gpu", "auto"] = Field(
        "cpu",
        description="Where the compressed model is served: cpu (the Serve replicas), gpu (a "
        "CUDA GPU, also needed where compress runs), or auto (gpu if compress sees one).",
    )
    max_drop: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="Refuse a compression whose validation accuracy, or tune.metric, is more "
        "than this many points (0.01 of the score each; for a loss, a rise) worse than the "
        "uncompressed model's; it is kept instead. A perplexity is judged by "
        "max_ppl_increase instead.",
    )
    max_ppl_increase: float = Field(
        0.05,
        ge=0.0,
        description="Refuse a compression whose validation perplexity (a language model's "
        "gate score, or tune.metric val_perplexity) is more than this much higher than the "
        "uncompressed model's, relative to it (0.05: 5% higher); it is kept instead.",
    )
    per_channel: bool = Field(
        True, description="int8 weights with one scale per output channel, not per matrix."
    )
    keep_float: list[str] | None = Field(
        None,
        description="Modules (names or name prefixes, e.g. classifier) that the int8 methods "
        "leave in float32; default: the task's head (a classifier's `classifier`).",
    )
    sensitive_layers: int = Field(
        0,
        ge=0,
        description="dynamic_int8/onnx_int8: also keep in float32 this many Linear layers, "
        "those whose int8 error hurts the outputs most on calibration rows of the training "
        "split.",
    )
    calibration_rows: int = Field(
        256, ge=8, description="Training rows that rank the layers for sensitive_layers."
    )
    quantize_embeddings: bool = Field(
        True,
        description="int8 methods: store the embedding tables as int8 with one scale per row "
        "(the word embeddings are most of a small model's size).",
    )
    prune: PruneSection | None = Field(
        None,
        description="Magnitude pruning (unstructured sparsity and/or whole attention heads) "
        "of the float model, and a short recovery fine-tune, before compress.method; null: off.",
    )
