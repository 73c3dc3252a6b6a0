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
                               scale(s), zero point(s) and float bias, every int8 embedding
                               table as int8 rows and per-row scales; every other tensor of
                               the state dict (LayerNorm, layers kept in float) as is
    model.onnx                 onnx_int8 only: an ONNX Runtime graph with int8 weights

``weights`` in ``lepton_model.json`` says which: ``adapter``, ``full`` (float32),
``int8`` (torch dynamic int8), ``bf16`` (``model/`` in bfloat16), ``onnx_int8`` (ONNX
Runtime) or ``gpu_weight_only`` (``model/`` in bfloat16, quantized to int8 or int4
weight-only on the GPU when loaded there). A compressed artifact also names its method in
``extra["quantization"]``.

Weights are only ever read from safetensors (or an ONNX protobuf, which holds data, not
code): loading an artifact never unpickles anything, so whoever can write an artifact
cannot run code where it is loaded.
"""

from __future__ import annotations

import contextlib
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
INT8_FORMAT = "lepton-int8-dynamic-v2"
# v1 (every Linear quantized, nothing else) is read as well; it is a special case of v2.
INT8_FORMATS = ("lepton-int8-dynamic-v1", INT8_FORMAT)
LEGACY_INT8_WEIGHTS = "model_int8.pt"
ONNX_FILE = "model.onnx"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_DIR = "model"

WEIGHT_KINDS = ("adapter", "full", "int8", "bf16", "onnx_int8", "gpu_weight_only")
GPU_WEIGHT_ONLY = ("int8_weight_only", "int4_weight_only")
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


def position_limit(cfg: ModelConfig) -> tuple[int, int] | None:
    """``(tokens, max_position_embeddings)``: the longest input ``model.name`` takes, by its
    ``config.json`` with ``model.config_overrides`` applied. None when that file cannot be read
    without a download, or the model has no absolute positions to run out of.

    Cheap (one small JSON file), so ``validate`` can check ``data.max_length`` before any
    stage runs instead of the model crashing on the first long text mid-training.
    """
    try:
        path = resolve_model_path(cfg.name)
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
        hf = {**json.loads(file.read_text()), **cfg.config_overrides}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    positions = hf.get("max_position_embeddings")
    if not isinstance(positions, int) or hf.get("position_biased_input") is False:
        return None
    padded = hf.get("model_type") in PADDED_POSITION_TYPES
    offset = int(hf.get("pad_token_id") or 0) + 1 if padded else 0
    return positions - offset, positions


def _default_cleaning() -> dict[str, Any]:
    return dict(DEFAULT_CLEANING)


@dataclass
class ModelMeta:
    """What ``lepton_model.json`` records about an artifact."""

    task: str
    labels: list[str]
    base_model: str
    max_length: int
    weights: str = "adapter"  # one of WEIGHT_KINDS
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

    if cfg.init_from:
        return _model_from_artifact(Path(cfg.init_from), labels)
    path = resolve_model_path(cfg.name)
    auto_cls = getattr(transformers, AUTO_CLASSES[task])
    hf_config = _classifier_config(path, labels, cfg.config_overrides)
    if cfg.random_init:
        torch.manual_seed(seed)
        return auto_cls.from_config(hf_config)
    return auto_cls.from_pretrained(path, config=hf_config)


def _model_from_artifact(folder: Path, labels: list[str]):
    """The float model of an artifact, to train further (``model.init_from``)."""
    if not (folder / META_FILE).is_file():
        raise ConfigError(f"model.init_from: {folder} is not a lepton-ray model artifact")
    meta = ModelMeta.load(folder)
    if meta.weights not in ("adapter", "full", "bf16"):
        raise ConfigError(
            f"model.init_from: {folder} holds {meta.weights} weights, which cannot be trained; "
            f"start from the uncompressed version it was made from"
        )
    if list(meta.labels) != list(labels):
        raise ConfigError(
            f"model.init_from: the model's labels {list(meta.labels)} differ from the data's "
            f"{list(labels)}"
        )
    model, _, _ = load_model_artifact(folder, merge=True)
    return model.float().train()


def save_model_artifact(model, tokenizer, meta: ModelMeta, folder: Path) -> None:
    """Write an artifact folder; for PEFT models only the adapter, unless the base is random."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    if meta.weights == "adapter":
        model.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
    else:
        model.save_pretrained(folder / FULL_DIR, safe_serialization=True)
    meta.save(folder)


def _first_line(err: BaseException, limit: int = 300) -> str:
    """The gist of a library error: its first non-empty line, cut at ``limit`` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if text.endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for X:"
        text = f"{text} {lines[1]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    a compressed artifact comes back compressed (int8, bf16, or an ONNX Runtime session
    wrapped to answer like one). Every kind is called the same way: ``model(**encoded)``
    returns an object with ``.logits`` (a torch tensor; bfloat16 for a bf16 artifact).
    Only safetensors weights are read: an artifact that holds pickled weights (``*.bin``,
    ``*.pt``) is refused with a ``StageError``.
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
    elif meta.weights == "bf16":
        model = _load_bf16(folder, auto_cls)
    elif meta.weights == "onnx_int8":
        model = _load_onnx(folder, meta)
    elif meta.weights == "gpu_weight_only":
        model = _load_gpu_weight_only(folder, auto_cls, meta)
    else:
        from peft import PeftModel

        # A random base travels inside the artifact ("./base"); others are named by id.
        base_path = _artifact_base(folder, meta.base_model)
        _require_safetensors(folder / ADAPTER_DIR, "re-run train", ADAPTER_WEIGHTS)
        hf_config = _classifier_config(base_path, meta.labels, meta.config_overrides)
        base = auto_cls.from_pretrained(base_path, config=hf_config, use_safetensors=True)
        try:
            model = PeftModel.from_pretrained(base, folder / ADAPTER_DIR)
            if merge:
                model = model.merge_and_unload()
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise StageError(
                f"{folder / ADAPTER_DIR}: the adapter does not match its base "
                f"{meta.base_model!r}: {_first_line(err)}"
            ) from None
    model.eval()
    return model, tokenizer, meta


@contextlib.contextmanager
def _quiet_quantization_warnings():
    """``torch.ao.quantization`` warns on every call that it is deprecated (eager-mode
    quantization moves to torchao, whose CPU int8 path is slower on these CPUs; see
    ``lepton_ray.compress``): said once in the docs, not once per layer in the log."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"(?s).*quantized tensor creation functions")
        yield


def quantize_dynamic_int8(
    model: torch.nn.Module,
    per_channel: bool = False,
    keep_float: Sequence[str] = (),
    embeddings: bool = False,
) -> torch.nn.Module:
    """int8 weights, fp32 activations quantized on the fly, for ``nn.Linear`` layers.

    ``per_channel``: one weight scale per output row instead of one per matrix.
    ``keep_float``: names of Linear (or embedding) modules left in float32, exactly or as a
    prefix (``classifier`` keeps the head). ``embeddings``: every ``nn.Embedding`` not kept
    becomes an int8 table with per-row scales (``Int8Embedding``). The model is copied,
    not changed. Defaults: every Linear, per-tensor scales, float embeddings.
    """
    import copy

    import torch
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    def kept(name: str) -> bool:
        return any(name == k or name.startswith(f"{k}.") for k in keep_float)

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    names = {
        n: qconfig
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not kept(n)
    }
    with _quiet_quantization_warnings():
        qmodel = quantize_dynamic(copy.deepcopy(model), names, dtype=torch.qint8)
    if embeddings:
        from lepton_ray.compress.modules import Int8Embedding, replace_module

        for name, module in list(qmodel.named_modules()):
            if isinstance(module, torch.nn.Embedding) and not kept(name):
                replace_module(qmodel, name, Int8Embedding.from_float(module))
    return qmodel.eval()


def _quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, DynamicLinear)}


def _int8_embeddings(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from lepton_ray.compress.modules import Int8Embedding

    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Embedding)}


def save_int8_artifact(model, tokenizer, meta: ModelMeta, folder: Path) -> None:
    """Save a quantized model: its config (to rebuild the structure) and int8 safetensors.

    Each dynamically quantized Linear ``name`` is stored as ``name.int8_weight`` (int8),
    ``name.int8_scale`` (float64) and ``name.int8_zero_point`` (int64) - scalars for a
    per-tensor qscheme, one per channel for a per-channel one - and ``name.bias``; its qscheme
    and axis go into the file's metadata. An int8 embedding table is its state as is
    (``name.weight_int8``, ``name.scale``), marked ``kind: embedding_int8`` in the metadata.
    Every other state-dict tensor (Linear layers kept in float among them) is stored as is.
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
        entry: dict[str, Any] = {"kind": "linear_dynamic_int8", "bias": module.bias() is not None}
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            entry["qscheme"] = "per_tensor_affine"
            scale = torch.tensor(weight.q_scale(), dtype=torch.float64)
            zero_point = torch.tensor(weight.q_zero_point(), dtype=torch.int64)
        elif scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
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
    for name, module in _int8_embeddings(model).items():
        layout[name] = {
            "kind": "embedding_int8",
            "shape": [module.num_embeddings, module.embedding_dim],
        }
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

    from lepton_ray.compress.modules import Int8Embedding, replace_module

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
    if header.get("format") not in INT8_FORMATS:
        raise StageError(f"{path}: not a lepton-ray int8 file (format {header.get('format')!r})")
    try:
        layout = json.loads(header["quantized"])
    except (KeyError, json.JSONDecodeError):
        raise StageError(f"{path}: metadata 'quantized' is missing or not JSON") from None
    if not isinstance(layout, dict) or not all(isinstance(v, dict) for v in layout.values()):
        raise StageError(f"{path}: metadata 'quantized' must map module names to objects")
    kinds = {name: entry.get("kind", "linear_dynamic_int8") for name, entry in layout.items()}
    unknown = sorted(set(kinds.values()) - {"linear_dynamic_int8", "embedding_int8"})
    if unknown:
        raise StageError(f"{path}: unknown quantized module kind(s) {unknown}")

    try:
        float_model = auto_cls.from_config(AutoConfig.from_pretrained(config_dir))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise StageError(f"{config_dir / 'config.json'}: cannot build the model ({err})") from None
    float_modules = dict(float_model.named_modules())
    linears = sorted(n for n, k in kinds.items() if k == "linear_dynamic_int8")
    embeddings = sorted(n for n, k in kinds.items() if k == "embedding_int8")
    all_linears = {n for n, m in float_modules.items() if isinstance(m, torch.nn.Linear)}
    wrong = [n for n in linears if n not in all_linears]
    wrong += [n for n in embeddings if not isinstance(float_modules.get(n), torch.nn.Embedding)]
    if wrong:
        raise StageError(
            f"{path} does not match its config: unknown quantized modules {sorted(wrong)[:3]}"
        )
    if header["format"] == INT8_FORMATS[0] and set(linears) != all_linears:
        absent = sorted(all_linears - set(linears))[:3]
        raise StageError(f"{path} does not match its config: missing quantized modules {absent}")
    model = quantize_dynamic_int8(float_model, keep_float=sorted(all_linears - set(linears)))
    for name in embeddings:
        old = float_modules[name]
        replace_module(
            model, name, Int8Embedding(old.num_embeddings, old.embedding_dim, old.padding_idx)
        )
    quantized = _quantized_linears(model)

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
        with _quiet_quantization_warnings():
            qweight = _qint8_weight(path, name, entry, int_weight, scale, zero_point)
            module.set_weight_bias(qweight, bias)
    for name in embeddings:
        module = model.get_submodule(name)
        for key, dtype in (("weight_int8", torch.int8), ("scale", torch.float32)):
            value = tensors.get(f"{name}.{key}")
            if value is not None and value.dtype != dtype:
                raise StageError(f"{path}: tensor {name}.{key} is {value.dtype}, expected {dtype}")
        expected = tuple(module.weight_int8.shape)
        got = tensors.get(f"{name}.weight_int8")
        if got is not None and tuple(got.shape) != expected:
            raise StageError(f"{path}: {name} has shape {tuple(got.shape)}, not {expected}")

    # What is left are the plain tensors (embeddings, LayerNorm, float layers, ...). A
    # quantized Linear's _load_from_state_dict insists on its own keys, so hand it back the
    # state it now has (from set_weight_bias), with this model's own module versions; the
    # file may not supply any of those keys itself.
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
    return model.eval()


def _qint8_weight(path: Path, name: str, entry: dict[str, Any], int_weight, scale, zero_point):
    import torch

    if entry.get("qscheme") == "per_tensor_affine":
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise StageError(f"{path}: {name} per-tensor scale/zero point must be scalars")
        return torch._make_per_tensor_quantized_tensor(
            int_weight, float(scale.item()), int(zero_point.item())
        )
    if entry.get("qscheme") == "per_channel_affine":
        axis = entry.get("axis")
        if not isinstance(axis, int) or not 0 <= axis < int_weight.dim():
            raise StageError(f"{path}: {name} has an invalid channel axis {axis!r}")
        channels = int_weight.shape[axis]
        if scale.shape != (channels,) or zero_point.shape != (channels,):
            raise StageError(f"{path}: {name} needs {channels} scales and zero points")
        return torch._make_per_channel_quantized_tensor(int_weight, scale, zero_point, axis)
    raise StageError(f"{path}: {name} has unsupported qscheme {entry.get('qscheme')!r}")


def save_float_artifact(model, tokenizer, meta: ModelMeta, folder: Path) -> None:
    """Write ``model/`` (config + safetensors, in the model's own dtype), tokenizer, meta:
    the layout of ``full``, ``bf16`` and ``gpu_weight_only`` artifacts."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder / FULL_DIR, safe_serialization=True)
    meta.save(folder)


def _load_bf16(folder: Path, auto_cls) -> torch.nn.Module:
    import torch

    _require_safetensors(folder / FULL_DIR, "re-run compress")
    return auto_cls.from_pretrained(folder / FULL_DIR, use_safetensors=True, dtype=torch.bfloat16)


def _load_gpu_weight_only(folder: Path, auto_cls, meta: ModelMeta) -> torch.nn.Module:
    """bf16 weights, quantized weight-only (int8 or int4) with torchao on the GPU at load:
    round-to-nearest, so the same weights that compress measured."""
    import torch

    method = meta.extra.get("quantization")
    if method not in GPU_WEIGHT_ONLY:
        raise StageError(
            f"{folder / META_FILE}: extra.quantization {method!r} is not one of "
            f"{', '.join(GPU_WEIGHT_ONLY)}"
        )
    if not torch.cuda.is_available():
        raise StageError(
            f"{folder}: a {method} model runs on a CUDA GPU and there is none here; "
            f"compress its source with a CPU method (compress.target: cpu)"
        )
    _require_safetensors(folder / FULL_DIR, "re-run compress")
    from lepton_ray.compress.modules import CudaModel, quantize_weight_only

    model = auto_cls.from_pretrained(folder / FULL_DIR, use_safetensors=True, dtype=torch.bfloat16)
    return CudaModel(quantize_weight_only(model.to("cuda"), method))


def _check_onnx_graph(graph, path: Path) -> None:
    """Refuse tensors stored outside the file (a path that could point anywhere) and
    operators from any domain but ONNX's own and ONNX Runtime's contrib ops."""
    import onnx

    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise StageError(f"{path}: tensor {tensor.name} refers to external data")
    for node in graph.node:
        if node.domain not in ("", "ai.onnx", "com.microsoft"):
            raise StageError(f"{path}: operator {node.op_type} of domain {node.domain!r}")
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _check_onnx_graph(sub, path)


def _load_onnx(folder: Path, meta: ModelMeta) -> torch.nn.Module:
    path = folder / ONNX_FILE
    if not path.is_file():
        raise StageError(f"{path}: ONNX model not found (re-run compress)")
    try:
        import onnx
        from google.protobuf.message import DecodeError

        from lepton_ray.compress.modules import OnnxClassifier
    except ImportError as err:
        raise StageError(
            f"{folder}: an onnx_int8 model needs onnx and onnxruntime ({err}); "
            f"pip install onnx onnxruntime"
        ) from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as err:
        raise StageError(f"{path}: not a valid ONNX file ({err})") from None
    _check_onnx_graph(proto.graph, path)
    try:
        model = OnnxClassifier(path)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types
        raise StageError(f"{path}: ONNX Runtime cannot load it ({err})") from None
    outputs = model.session.get_outputs()[0].shape
    if len(outputs) != 2 or (isinstance(outputs[1], int) and outputs[1] != len(meta.labels)):
        raise StageError(f"{path}: output shape {outputs} does not match {len(meta.labels)} labels")
    return model


def folder_size_mb(folder: Path, pattern: str = "*") -> float:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file()) / 1e6
