"""Model artifacts: what one holds, and the float kinds (adapter, full, bf16) training writes.

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

The compressed kinds (int8, onnx_int8, gpu_weight_only) are ``compress/formats.py``'s, and
``compress.formats.load_model_artifact`` loads every kind. Which transformers class holds the
weights is the task's (``tasks``, by ``lepton_model.json``'s ``task``).

Weights are only ever read from safetensors (or an ONNX protobuf, which holds data, not
code): loading an artifact never unpickles anything, so whoever can write an artifact
cannot run code where it is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_ray.config import ModelConfig, resolve_model_path
from lepton_ray.errors import ConfigError, StageError
from lepton_ray.tasks import TASKS, get_task
from lepton_ray.text import DEFAULT_CLEANING, pii_kinds

if TYPE_CHECKING:
    import torch

META_FILE = "lepton_model.json"
ARTIFACT_KEY = "lepton_model"
"""Name of the artifact inside a registered version's MLflow pyfunc package."""
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_DIR = "model"

WEIGHT_KINDS = ("adapter", "full", "int8", "bf16", "onnx_int8", "gpu_weight_only")
UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


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

        if self.task not in TASKS:
            raise bad(f"task '{self.task}' is not one of {', '.join(TASKS)}")
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


def build_model(cfg: ModelConfig, task: str, labels: list[str], seed: int = 0):
    """The model to fine-tune: ``model.init_from``'s artifact, else the task builds it
    (pretrained weights, or random ones from the config)."""
    if cfg.init_from:
        return _with_dropout(model_from_artifact(Path(cfg.init_from), labels), cfg)
    return get_task(task).build_model(resolve_model_path(cfg.name), cfg, labels, seed=seed)


def _with_dropout(model, cfg: ModelConfig):
    """``model`` rebuilt with ``model.dropout`` and its own weights: dropout is fixed when
    a model is built from its config (modules, or a rate the attention reads), so a loaded
    one is built again from the changed config."""
    import copy

    from lepton_ray.config.regularization import set_dropout

    config = copy.deepcopy(model.config)
    if not set_dropout(config, cfg.dropout):
        return model
    rebuilt = type(model)(config)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt.float().train()


def model_from_artifact(folder: Path, labels: list[str]):
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
    why_not = unmerged_refusal(meta, "model.init_from")
    if why_not:
        raise ConfigError(why_not)
    model, _, _ = load_float_artifact(folder, merge=True)
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


def pickle_refusal(path: Path, hint: str) -> StageError:
    return StageError(
        f"{path} is a pickle file; lepton-ray loads only safetensors weights ({hint})"
    )


def require_safetensors(folder: Path, hint: str, name: str | None = None) -> None:
    """Refuse a weights folder unless it holds safetensors weights (``name``, or any)."""
    if not folder.is_dir():
        raise StageError(f"{folder}: weights folder not found ({hint})")
    if (folder / name).is_file() if name else any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise pickle_refusal(pickles[0], hint)
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
    require_safetensors(base, "re-run train")
    return str(base)


def save_float_artifact(model, tokenizer, meta: ModelMeta, folder: Path) -> None:
    """Write ``model/`` (config + safetensors, in the model's own dtype), tokenizer, meta:
    the layout of ``full``, ``bf16`` and ``gpu_weight_only`` artifacts."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder / FULL_DIR, safe_serialization=True)
    meta.save(folder)


def _load_bf16(folder: Path, auto_cls) -> torch.nn.Module:
    import torch

    from lepton_ray.heads import load_pretrained

    require_safetensors(folder / FULL_DIR, "re-run compress")
    return load_pretrained(auto_cls, folder / FULL_DIR, dtype=torch.bfloat16)


def folder_size_mb(folder: Path, pattern: str = "*") -> float:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file()) / 1e6


def load_float_artifact(folder: str | Path, merge: bool = True):
    """Load ``(model, tokenizer, meta)`` of a float artifact (adapter, full or bf16), in eval
    mode on the CPU; PEFT adapters are merged into the base (``merge``) so the result is a
    plain transformers model, except those of a method that cannot merge (prefix and prompt
    tuning add virtual tokens): a ``PeftModel`` comes back (``merges``, ``unmerged_refusal``).
    Any kind: ``compress.formats.load_model_artifact``.

    Raises:
        StageError: pickled weights, an adapter that does not fit its base, or a kind that
            is not a float one.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    meta = ModelMeta.load(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = get_task(meta.task)
    auto_cls = task.load_class()
    if meta.weights == "full":
        from lepton_ray.heads import load_pretrained

        require_safetensors(folder / FULL_DIR, "re-run train")
        # A head-pruned model (compress.prune) is rebuilt at its smaller shapes first.
        model = load_pretrained(auto_cls, folder / FULL_DIR)
    elif meta.weights == "bf16":
        model = _load_bf16(folder, auto_cls)
    elif meta.weights == "adapter":
        from peft import PeftModel

        # A random base travels inside the artifact ("./base"); others are named by id.
        base_path = _artifact_base(folder, meta.base_model)
        require_safetensors(folder / ADAPTER_DIR, "re-run train", ADAPTER_WEIGHTS)
        hf_config = task.model_config(base_path, meta.labels, meta.config_overrides)
        base = auto_cls.from_pretrained(base_path, config=hf_config, use_safetensors=True)
        try:
            model = PeftModel.from_pretrained(base, folder / ADAPTER_DIR)
            if merge and merges(meta):
                model = model.merge_and_unload()
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise StageError(
                f"{folder / ADAPTER_DIR}: the adapter does not match its base "
                f"{meta.base_model!r}: {_first_line(err)}"
            ) from None
    else:
        raise StageError(f"{folder}: {meta.weights} weights are not float ones")
    model.eval()
    return model, tokenizer, meta


def merges(meta: ModelMeta) -> bool:
    """Whether the artifact loads as a plain transformers model (no adapter, or one that
    folds into the base weights); else it loads as a ``PeftModel`` with virtual tokens."""
    from lepton_ray.config.peft import MERGEABLE

    return meta.weights != "adapter" or meta.peft_method in MERGEABLE


def unmerged_refusal(meta: ModelMeta, what: str) -> str | None:
    """Why ``what`` (a stage that needs a plain transformers model: compression, an export,
    a serving engine) cannot take this artifact; None where it can."""
    if merges(meta):
        return None
    return (
        f"{what} needs a plain transformers model, but this artifact holds a "
        f"peft.method={meta.peft_method} adapter, whose virtual tokens cannot be merged into "
        "the base weights; train with peft.method lora, adalora or ia3 (mergeable) for it"
    )


def artifact_folder(package: Path) -> Path:
    """The lepton-ray artifact inside a downloaded registered version (an MLflow pyfunc
    package keeps it under ``artifacts/<ARTIFACT_KEY>``; a legacy version is one itself)."""
    package = Path(package)
    if (package / META_FILE).is_file() or not (package / "MLmodel").is_file():
        return package
    inner = package / "artifacts" / ARTIFACT_KEY
    if (inner / META_FILE).is_file():
        return inner
    found = sorted((package / "artifacts").glob(f"*/{META_FILE}"))
    if not found:
        raise StageError(f"{package}: an MLflow model without a lepton-ray artifact inside")
    return found[0].parent
