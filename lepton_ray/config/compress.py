"""The ``compress`` section: how the trained model is quantized for serving, and how much
worse than the uncompressed model it may score."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lepton_ray.config.base import Section


class CompressSection(Section):
    enabled: bool = True
    method: Literal[
        "auto",
        "dynamic_int8",
        "onnx_int8",
        "bf16",
        "int8_weight_only",
        "int4_weight_only",
        "none",
    ] = Field(
        "auto",
        description="auto: chosen from the hardware (CPU: bf16 weights where it has AMX, else "
        "dynamic_int8; GPU: int8_weight_only). dynamic_int8: torch int8 Linear layers, "
        "activations quantized per batch. onnx_int8: ONNX Runtime graph with int8 weights. "
        "bf16: bfloat16 weights. int8_weight_only / int4_weight_only: torchao, GPU only. "
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
