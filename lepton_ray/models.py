"""Build and load models and tokenizers; shared by train, compress and serve.

A model *artifact* is a folder that any stage can load without the config that made it:

    lepton_model.json          task, labels, base model id, max length, text cleaning,
                               how the weights are stored
    tokenizer files
    adapter/                   PEFT adapter: adapter_config.json + adapter_model.safetensors,
                               when the base is loadable by its id (or travels in ./base)
    base/                      a random base (config.json + model.safetensors), when it
                               cannot be rebuilt from its id
    model/                     full weights (config.json + model.safetensors)
    config/config.json         int8 only: the transformers config that rebuilds the structure
    model_int8.safetensors     int8 only: every dynamically quantized Linear as int8 weight,
                               scale(s), zero point(s) and float bias; every other tensor of
                               the state dict as is

Weights are only ever read from safetensors: loading an artifact never unpickles anything,
so whoever can write an artifact cannot run code where it is loaded.
"""

from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_ray.config import MODEL_ALIASES, ModelConfig
from lepton_ray.errors import ConfigError, StageError
from lepton_ray.text import DEFAULT_CLEANING, clean_texts, pii_kinds

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

META_FILE = "lepton_model.json"
INT8_WEIGHTS = "model_int8.safetensors"
INT8_CONFIG_DIR = "config"
INT8_FORMAT = "lepton-int8-dynamic-v1"
LEGACY_INT8_WEIGHTS = "model_int8.pt"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_DIR = "model"

WEIGHT_KINDS = ("adapter", "full", "int8")
UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

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


def _default_cleaning() -> dict[str, Any]:
    return dict(DEFAULT_CLEANING)


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
    # How raw text is cleaned before tokenizing (lepton_ray.text.clean_texts), as in training.
    cleaning: dict[str, Any] = field(default_factory=_default_cleaning)

    def save(self, folder: Path) -> None:
        (folder / META_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> ModelMeta:
        """Read and check ``lepton_model.json``; unknown keys (from newer writers) are ignored."""
        path = Path(folder) / META_FILE
        if not path.is_file():
            raise StageError(f"{folder} is not a lepton-ray model artifact (no {META_FILE})")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StageError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise StageError(f"{path}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        required = {"task", "labels", "base_model", "max_length"}
        missing = sorted(required - data.keys())
        if missing:
            raise StageError(f"{path}: missing field(s) {', '.join(missing)}")
        meta = cls(**{k: v for k, v in data.items() if k in known})
        meta._check(path)
        return meta

    def _check(self, path: Path) -> None:
        def bad(what: str) -> StageError:
            return StageError(f"{path}: {what}")

        if self.task not in AUTO_CLASSES:
            raise bad(f"task '{self.task}' is not one of {', '.join(AUTO_CLASSES)}")
        if self.weights not in WEIGHT_KINDS:
            raise bad(f"weights '{self.weights}' is not one of {', '.join(WEIGHT_KINDS)}")
        if not isinstance(self.labels, list) or not all(isinstance(x, str) for x in self.labels):
            raise bad("labels must be a list of strings")
        if not isinstance(self.base_model, str) or not self.base_model:
            raise bad("base_model must be a non-empty string")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
            raise bad("max_length must be an integer")
        if self.max_length < 1:
            raise bad("max_length must be positive")
        for name in ("config_overrides", "extra", "cleaning"):
            if not isinstance(getattr(self, name), dict):
                raise bad(f"{name} must be a JSON object")
        self.cleaning = {**DEFAULT_CLEANING, **self.cleaning}
        if self.cleaning["unicode_form"] not in UNICODE_FORMS:
            raise bad(
                f"cleaning.unicode_form '{self.cleaning['unicode_form']}' is not one of "
                f"{', '.join(UNICODE_FORMS)}"
            )
        if not isinstance(self.cleaning["lowercase"], bool):
            raise bad("cleaning.lowercase must be true or false")
        if not isinstance(self.cleaning["strip_html"], bool):
            raise bad("cleaning.strip_html must be true or false")
        try:
            pii_kinds(self.cleaning["mask_pii"])
        except (TypeError, ValueError) as err:
            raise bad(f"cleaning.mask_pii: {err}") from None


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def encode_texts(
    tokenizer, meta: ModelMeta, texts: Sequence[str], max_length: int | None = None
) -> tuple[Any, list[bool]]:
    """Clean raw texts as training did, then tokenize them for the model.

    Returns ``(inputs, truncated)``: the padded ``BatchEncoding`` of torch tensors, truncated
    at ``max_length`` (default ``meta.max_length``) tokens, and per text whether truncation cut
    it. Every caller that runs a loaded model on raw text goes through here.
    """
    limit = int(max_length or meta.max_length)
    cleaned = clean_texts(texts, meta.cleaning)
    inputs = tokenizer(
        cleaned, truncation=True, max_length=limit, padding=True, return_tensors="pt"
    )
    truncated = [False] * len(cleaned)
    if "attention_mask" in inputs:
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
    else:
        pad = tokenizer.pad_token_id
        lengths = [sum(1 for t in row if t != pad) for row in inputs["input_ids"].tolist()]
    # Only a text that fills the limit can have been cut; measure just those in full.
    full = [i for i, n in enumerate(lengths) if n >= limit]
    if full:
        ids = tokenizer([cleaned[i] for i in full], truncation=False, verbose=False)["input_ids"]
        for i, row in zip(full, ids, strict=True):
            truncated[i] = len(row) > limit
    return inputs, truncated


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
        model.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
    else:
        model.save_pretrained(folder / FULL_DIR, safe_serialization=True)
    meta.save(folder)


def _pickle_refusal(path: Path, hint: str) -> StageError:
    return StageError(
        f"{path} is a pickle file; lepton-ray loads only safetensors weights ({hint})"
    )


def _require_safetensors(folder: Path, hint: str, name: str | None = None) -> None:
    """Refuse a weights folder unless it holds safetensors weights (``name``, or any)."""
    if not folder.is_dir():
        raise StageError(f"{folder}: weights folder not found ({hint})")
    if (folder / name).is_file() if name else any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_refusal(pickles[0], hint)
    raise StageError(f"{folder / (name or '*.safetensors')}: no safetensors weights ({hint})")


def _artifact_base(folder: Path, base_model: str) -> str:
    """Where an adapter's base lives: inside the artifact (``./...``) or by id/path."""
    if not base_model.startswith("./"):
        return resolve_model_path(base_model)
    root = folder.resolve()
    base = (folder / base_model).resolve()
    if base == root or not base.is_relative_to(root):
        raise StageError(
            f"{folder / META_FILE}: base_model '{base_model}' is not a folder inside the "
            f"artifact folder; a './' base may not leave it"
        )
    if not (base / "config.json").is_file():
        raise StageError(f"{base}: the artifact's base model folder has no config.json")
    _require_safetensors(base, "re-run train")
    return str(base)


def load_model_artifact(folder: str | Path, merge: bool = True):
    """Load ``(model, tokenizer, meta)`` from an artifact folder, in eval mode on the CPU.

    PEFT adapters are merged into the base so the result is a plain transformers model;
    an int8 artifact comes back quantized. Only safetensors weights are read: an artifact
    that holds pickled weights (``*.bin``, ``*.pt``) is refused with a ``StageError``.
    """
    import transformers
    from transformers import AutoTokenizer

    folder = Path(folder)
    meta = ModelMeta.load(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    auto_cls = getattr(transformers, AUTO_CLASSES[meta.task])
    if meta.weights == "int8":
        model = _load_int8(folder, auto_cls)
    elif meta.weights == "full":
        _require_safetensors(folder / FULL_DIR, "re-run train")
        model = auto_cls.from_pretrained(folder / FULL_DIR, use_safetensors=True)
    else:
        from peft import PeftModel

        # A random base travels inside the artifact ("./base"); others are named by id.
        base_path = _artifact_base(folder, meta.base_model)
        _require_safetensors(folder / ADAPTER_DIR, "re-run train", ADAPTER_WEIGHTS)
        hf_config = _classifier_config(base_path, meta.labels, meta.config_overrides)
        base = auto_cls.from_pretrained(base_path, config=hf_config, use_safetensors=True)
        model = PeftModel.from_pretrained(base, folder / ADAPTER_DIR)
        if merge:
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer, meta


def quantize_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """int8 weights, fp32 activations quantized on the fly, for every ``nn.Linear``."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, DynamicLinear)}


def save_int8_artifact(model, tokenizer, meta: ModelMeta, folder: Path) -> None:
    """Save a quantized model: its config (to rebuild the structure) and int8 safetensors.

    Each dynamically quantized Linear ``name`` is stored as ``name.int8_weight`` (int8),
    ``name.int8_scale`` (float64) and ``name.int8_zero_point`` (int64) - scalars for a
    per-tensor qscheme, one per channel for a per-channel one - and ``name.bias``; its qscheme
    and axis go into the file's metadata. Every other state-dict tensor is stored as is.
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder / INT8_CONFIG_DIR)
    quantized = _quantized_linears(model)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name, module in quantized.items():
        weight = module.weight()
        if not weight.is_quantized or weight.dtype != torch.qint8:
            raise StageError(f"{name}: expected a qint8 weight, got {weight.dtype}")
        scheme = weight.qscheme()
        entry: dict[str, Any] = {"bias": module.bias() is not None}
        if scheme == torch.per_tensor_affine:
            entry["qscheme"] = "per_tensor_affine"
            scale = torch.tensor(weight.q_scale(), dtype=torch.float64)
            zero_point = torch.tensor(weight.q_zero_point(), dtype=torch.int64)
        elif scheme == torch.per_channel_affine:
            entry["qscheme"] = "per_channel_affine"
            entry["axis"] = int(weight.q_per_channel_axis())
            scale = weight.q_per_channel_scales().to(torch.float64)
            zero_point = weight.q_per_channel_zero_points().to(torch.int64)
        else:
            raise StageError(f"{name}: unsupported qscheme {scheme}")
        tensors[f"{name}.int8_weight"] = weight.int_repr().contiguous()
        tensors[f"{name}.int8_scale"] = scale.contiguous()
        tensors[f"{name}.int8_zero_point"] = zero_point.contiguous()
        if entry["bias"]:
            tensors[f"{name}.bias"] = module.bias().detach().float().contiguous()
        layout[name] = entry
    prefixes = tuple(f"{name}." for name in quantized)
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        if not isinstance(value, torch.Tensor) or value.is_quantized:
            raise StageError(f"{key}: cannot store {type(value).__name__} in safetensors")
        tensors[key] = value.detach().cpu().clone().contiguous()
    save_file(
        tensors,
        str(folder / INT8_WEIGHTS),
        metadata={"format": INT8_FORMAT, "quantized": json.dumps(layout, sort_keys=True)},
    )
    meta.save(folder)


def _load_int8(folder: Path, auto_cls) -> torch.nn.Module:
    """Rebuild an int8 model from ``config/`` and ``model_int8.safetensors``."""
    import torch
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig

    path = folder / INT8_WEIGHTS
    if not path.is_file():
        legacy = folder / LEGACY_INT8_WEIGHTS
        if legacy.is_file():
            raise _pickle_refusal(legacy, "re-run compress")
        raise StageError(f"{path}: int8 weights not found (re-run compress)")
    config_dir = folder / INT8_CONFIG_DIR
    if not (config_dir / "config.json").is_file():
        raise StageError(f"{config_dir / 'config.json'}: int8 model config not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise StageError(f"{path}: not a valid safetensors file ({err})") from None
    if header.get("format") != INT8_FORMAT:
        raise StageError(f"{path}: not a lepton-ray int8 file (format {header.get('format')!r})")
    try:
        layout = json.loads(header["quantized"])
    except (KeyError, json.JSONDecodeError):
        raise StageError(f"{path}: metadata 'quantized' is missing or not JSON") from None

    model = quantize_dynamic_int8(auto_cls.from_config(AutoConfig.from_pretrained(config_dir)))
    quantized = _quantized_linears(model)
    if set(layout) != set(quantized):
        extra = sorted(set(layout) - set(quantized))[:3]
        absent = sorted(set(quantized) - set(layout))[:3]
        raise StageError(
            f"{path} does not match its config: unknown quantized modules {extra}, missing {absent}"
        )

    def take(key: str, dtype: torch.dtype) -> torch.Tensor:
        value = tensors.pop(key, None)
        if value is None:
            raise StageError(f"{path}: tensor {key} is missing")
        if value.dtype != dtype:
            raise StageError(f"{path}: tensor {key} is {value.dtype}, expected {dtype}")
        return value

    for name, module in quantized.items():
        entry = layout[name]
        int_weight = take(f"{name}.int8_weight", torch.int8)
        scale = take(f"{name}.int8_scale", torch.float64)
        zero_point = take(f"{name}.int8_zero_point", torch.int64)
        bias = take(f"{name}.bias", torch.float32) if entry.get("bias") else None
        shape = tuple(module.weight().shape)
        if tuple(int_weight.shape) != shape or (bias is not None and bias.shape != shape[:1]):
            raise StageError(f"{path}: {name} has shape {tuple(int_weight.shape)}, not {shape}")
        if entry.get("qscheme") == "per_tensor_affine":
            if scale.numel() != 1 or zero_point.numel() != 1:
                raise StageError(f"{path}: {name} per-tensor scale/zero point must be scalars")
            qweight = torch._make_per_tensor_quantized_tensor(
                int_weight, float(scale.item()), int(zero_point.item())
            )
        elif entry.get("qscheme") == "per_channel_affine":
            axis = entry.get("axis")
            if not isinstance(axis, int) or not 0 <= axis < int_weight.dim():
                raise StageError(f"{path}: {name} has an invalid channel axis {axis!r}")
            channels = int_weight.shape[axis]
            if scale.shape != (channels,) or zero_point.shape != (channels,):
                raise StageError(f"{path}: {name} needs {channels} scales and zero points")
            qweight = torch._make_per_channel_quantized_tensor(int_weight, scale, zero_point, axis)
        else:
            raise StageError(f"{path}: {name} has unsupported qscheme {entry.get('qscheme')!r}")
        module.set_weight_bias(qweight, bias)

    # What is left are the plain float tensors (embeddings, LayerNorm, ...). A quantized
    # Linear's _load_from_state_dict insists on its own keys, so hand it back the state it
    # now has (from set_weight_bias), with this model's own module versions; the file may
    # not supply any of those keys itself.
    own = tuple(f"{name}." for name in quantized)
    stray = [k for k in tensors if k.startswith(own)]
    if stray:
        raise StageError(f"{path} does not match its config: unexpected {stray[:3]}")
    current = model.state_dict()
    merged = OrderedDict(tensors)
    merged.update((k, v) for k, v in current.items() if k.startswith(own))
    merged._metadata = current._metadata  # module versions: tells quantized Linear its format
    try:
        result = model.load_state_dict(merged, strict=False)
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise StageError(f"{path} does not match its config: {first}") from None
    missing = [k for k in result.missing_keys if not k.startswith(own)]
    if missing or result.unexpected_keys:
        raise StageError(
            f"{path} does not match its config: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    return model


def folder_size_mb(folder: Path, pattern: str = "*") -> float:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file()) / 1e6
