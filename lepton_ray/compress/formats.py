"""The serving formats compression writes, and loading a model artifact of any kind.

Compressed kinds (``weights`` in ``lepton_model.json``):

    int8             torch dynamic int8: ``config/config.json`` rebuilds the structure (and
                     ``config/generation_config.json`` a text generator's defaults) and
                     ``model_int8.safetensors`` holds every quantized Linear as int8 weight,
                     scale(s), zero point(s) and float bias, every int8 embedding table as
                     int8 rows and per-row scales, and every other tensor as is (a tensor
                     that two modules share, tied embeddings and head, once: ``tied``)
    onnx_int8        ``model.onnx``: an ONNX Runtime graph with int8 weights
    gpu_weight_only  ``model/`` in bfloat16, quantized to int8 or int4 weight-only on the
                     GPU when loaded there

The float kinds (adapter, full, bf16) are ``lepton_ray.artifacts``'. Weights are read from
safetensors or an ONNX protobuf only: loading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_ray.artifacts import (
    FULL_DIR,
    META_FILE,
    ModelMeta,
    load_float_artifact,
    pickle_refusal,
    require_safetensors,
)
from lepton_ray.errors import StageError
from lepton_ray.tasks import get_task

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

FLOAT_KINDS = ("adapter", "full", "bf16")

INT8_WEIGHTS = "model_int8.safetensors"
INT8_CONFIG_DIR = "config"
GENERATION_CONFIG = "generation_config.json"
INT8_FORMAT = "lepton-int8-dynamic-v2"
# v1 (every Linear quantized, nothing else) is read as well; it is a special case of v2.
INT8_FORMATS = ("lepton-int8-dynamic-v1", INT8_FORMAT)
LEGACY_INT8_WEIGHTS = "model_int8.pt"
ONNX_FILE = "model.onnx"
GPU_WEIGHT_ONLY = ("int8_weight_only", "int4_weight_only")


def load_model_artifact(folder: str | Path, merge: bool = True):
    """Load ``(model, tokenizer, meta)`` from an artifact folder of any kind, in eval mode.

    A float artifact comes back as a plain transformers model (PEFT adapters merged,
    ``artifacts.load_float_artifact``); a compressed one comes back compressed (int8, or an
    ONNX Runtime session wrapped to answer like one; gpu_weight_only on the GPU). Every kind
    is called the same way: ``model(**encoded)`` returns an object with ``.logits`` (a torch
    tensor; bfloat16 for a bf16 artifact). A model that generates text (float, bf16, int8 or
    gpu_weight_only; compress never makes an onnx_int8 one) also has ``model.generate``, so
    ``task.predict`` answers with it. Only safetensors weights are read: an artifact that
    holds pickled weights (``*.bin``, ``*.pt``) is refused with a ``StageError``.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    meta = ModelMeta.load(folder)
    if meta.weights in FLOAT_KINDS:
        return load_float_artifact(folder, merge=merge)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    auto_cls = get_task(meta.task).load_class()
    if meta.weights == "int8":
        model = _load_int8(folder, auto_cls)
    elif meta.weights == "onnx_int8":
        model = _load_onnx(folder, meta)
    else:  # gpu_weight_only (ModelMeta.load admits no other kind)
        model = _load_gpu_weight_only(folder, auto_cls, meta)
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
    becomes an int8 table with per-row scales (``Int8Embedding``), except one tied to a
    module that stays float (a language model's head, when kept). The model is copied,
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

        # A table tied to a module that stays float (a language model's output head, kept
        # float) stays float too: as int8 it would be stored twice, once each way.
        shared = {
            id(p)
            for m in qmodel.modules()
            if not isinstance(m, torch.nn.Embedding)
            for p in m.parameters(recurse=False)
        }
        for name, module in list(qmodel.named_modules()):
            embedding = isinstance(module, torch.nn.Embedding)
            if embedding and not kept(name) and id(module.weight) not in shared:
                replace_module(qmodel, name, Int8Embedding.from_float(module))
    return qmodel.eval()


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
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
    Every other state-dict tensor (Linear layers kept in float among them) is stored as is,
    once: a tensor shared with an earlier key (tied embeddings and head) is named in the
    metadata's ``tied`` (key -> the stored key) instead.
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder / INT8_CONFIG_DIR)
    if _generates(model):  # how it generates by default (stop tokens, lengths) travels too
        model.generation_config.save_pretrained(folder / INT8_CONFIG_DIR)
    quantized = quantized_linears(model)
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
    stored: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        if not isinstance(value, torch.Tensor) or value.is_quantized:
            raise StageError(f"{key}: cannot store {type(value).__name__} in safetensors")
        # A tensor shared by two modules (tied embeddings and head) is stored once.
        same = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.numel() and same in stored:
            tied[key] = stored[same]
            continue
        stored[same] = key
        tensors[key] = value.detach().cpu().clone().contiguous()
    header = {"format": INT8_FORMAT, "quantized": json.dumps(layout, sort_keys=True)}
    if tied:
        header["tied"] = json.dumps(tied, sort_keys=True)
    save_file(tensors, str(folder / INT8_WEIGHTS), metadata=header)
    meta.save(folder)


def _generates(model) -> bool:
    check = getattr(model, "can_generate", None)
    return (
        callable(check) and bool(check()) and getattr(model, "generation_config", None) is not None
    )


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
            raise pickle_refusal(legacy, "re-run compress")
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
    try:
        tied = json.loads(header.get("tied", "{}"))
    except json.JSONDecodeError:
        raise StageError(f"{path}: metadata 'tied' is not JSON") from None
    if not isinstance(tied, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v in tensors for k, v in tied.items()
    ):
        raise StageError(f"{path}: metadata 'tied' must map tensor names to stored tensors")
    kinds = {name: entry.get("kind", "linear_dynamic_int8") for name, entry in layout.items()}
    unknown = sorted(set(kinds.values()) - {"linear_dynamic_int8", "embedding_int8"})
    if unknown:
        raise StageError(f"{path}: unknown quantized module kind(s) {unknown}")

    try:
        float_model = auto_cls.from_config(AutoConfig.from_pretrained(config_dir))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise StageError(f"{config_dir / 'config.json'}: cannot build the model ({err})") from None
    from lepton_ray.heads import restore_structure

    restore_structure(float_model)  # a head-pruned model's smaller attention (compress.prune)
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
    if _generates(model) and (config_dir / GENERATION_CONFIG).is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(config_dir)
        except (OSError, ValueError, TypeError) as err:
            raise StageError(
                f"{config_dir / GENERATION_CONFIG}: not a generation config ({err})"
            ) from None
    for name in embeddings:
        old = float_modules[name]
        replace_module(
            model, name, Int8Embedding(old.num_embeddings, old.embedding_dim, old.padding_idx)
        )
    quantized = quantized_linears(model)

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
    merged.update((key, tensors[target]) for key, target in tied.items())
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
    require_safetensors(folder / FULL_DIR, "re-run compress")
    from lepton_ray.compress.modules import CudaModel, quantize_weight_only
    from lepton_ray.heads import load_pretrained

    model = load_pretrained(auto_cls, folder / FULL_DIR, dtype=torch.bfloat16)
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
