"""Build and load models and tokenizers; shared by train, compress and serve.

A model *artifact* is a folder that any stage can load without the config that made it:

    lepton_model.json     task, labels, base model id, how the weights are stored
    tokenizer files
    adapter/              PEFT adapter (safetensors), when the base is loadable by its id
    model/                full weights (safetensors), when the base cannot be rebuilt by id
    model_int8.pt         int8 dynamically quantized state dict (after compress)
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_ray.config import MODEL_ALIASES, ModelConfig
from lepton_ray.errors import ConfigError, StageError

if TYPE_CHECKING:
    import torch

META_FILE = "lepton_model.json"

AUTO_CLASSES = {
    # task -> transformers auto class; token classification and causal LM slot in here.
    "sequence_classification": "AutoModelForSequenceClassification",
}


def resolve_model_path(name: str) -> str:
    """Turn a model alias, local folder or hub id into what ``from_pretrained`` takes."""
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


@dataclass
class ModelMeta:
    """What ``lepton_model.json`` records about an artifact."""

    task: str
    labels: list[str]
    base_model: str
    max_length: int
    weights: str = "adapter"  # "adapter" | "full" | "int8"
    peft_method: str = "none"
    config_overrides: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        (folder / META_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> ModelMeta:
        path = folder / META_FILE
        if not path.is_file():
            raise StageError(f"{folder} is not a lepton-ray model artifact (no {META_FILE})")
        return cls(**json.loads(path.read_text()))


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def _classifier_config(path: str, labels: list[str], overrides: dict[str, Any]):
    """The transformers config of ``path`` with a head for ``labels``."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        **overrides,
    )


def build_model(cfg: ModelConfig, task: str, labels: list[str], seed: int = 0):
    """Build the model to fine-tune: pretrained weights, or random ones from the config."""
    import torch
    import transformers

    path = resolve_model_path(cfg.name)
    auto_cls = getattr(transformers, AUTO_CLASSES[task])
    hf_config = _classifier_config(path, labels, cfg.config_overrides)
    if cfg.random_init:
        torch.manual_seed(seed)
        return auto_cls.from_config(hf_config)
    return auto_cls.from_pretrained(path, config=hf_config)


def save_model_artifact(model, tokenizer, meta: ModelMeta, folder: Path) -> None:
    """Write an artifact folder; for PEFT models only the adapter, unless the base is random."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    if meta.weights == "adapter":
        model.save_pretrained(folder / "adapter")
    else:
        model.save_pretrained(folder / "model", safe_serialization=True)
    meta.save(folder)


def load_model_artifact(folder: str | Path, merge: bool = True):
    """Load ``(model, tokenizer, meta)`` from an artifact folder, in eval mode on the CPU.

    PEFT adapters are merged into the base so the result is a plain transformers model;
    an int8 artifact comes back quantized.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    meta = ModelMeta.load(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    auto_cls = getattr(transformers, AUTO_CLASSES[meta.task])
    if meta.weights == "int8":
        hf_config = AutoConfig.from_pretrained(folder / "config")
        model = auto_cls.from_config(hf_config)
        model = quantize_dynamic_int8(model)
        state = torch.load(folder / "model_int8.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state)
    elif meta.weights == "full":
        model = auto_cls.from_pretrained(folder / "model")
    else:
        from peft import PeftModel

        # A random base travels inside the artifact ("./base"); others are named by id.
        base_path = (
            str(folder / meta.base_model)
            if meta.base_model.startswith("./")
            else resolve_model_path(meta.base_model)
        )
        hf_config = _classifier_config(base_path, meta.labels, meta.config_overrides)
        base = auto_cls.from_pretrained(base_path, config=hf_config)
        model = PeftModel.from_pretrained(base, folder / "adapter")
        if merge:
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer, meta


def quantize_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """int8 weights, fp32 activations quantized on the fly, for every ``nn.Linear``."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def save_int8_artifact(model, tokenizer, meta: ModelMeta, folder: Path) -> None:
    """Save a quantized model: its config (to rebuild the structure) and the int8 state dict."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder / "config")
    torch.save(model.state_dict(), folder / "model_int8.pt")
    meta.save(folder)


def folder_size_mb(folder: Path, pattern: str = "*") -> float:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file()) / 1e6
