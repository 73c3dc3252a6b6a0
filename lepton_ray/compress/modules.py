"""Runtime pieces of the compressed formats, loaded by ``lepton_ray.artifacts`` wherever a
compressed artifact is served: an int8 embedding table, an ONNX Runtime classifier and a
GPU model's wrapper.

Nothing heavy is imported at module import; torch is (the caller has it already).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 with one float32 scale per row (symmetric).

    A looked-up row is ``weight_int8[i] * scale[i]``: only the rows a batch needs are
    dequantized, so the table costs a quarter of its float32 size in memory and on disk.
    The worst-case error of an entry is half a step, ``scale[i] / 2 = max|row i| / 254``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer(
            "weight_int8", torch.zeros((num_embeddings, embedding_dim), dtype=torch.int8)
        )
        self.register_buffer("scale", torch.ones(num_embeddings, dtype=torch.float32))

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> Int8Embedding:
        weight = embedding.weight.detach().float()
        out = cls(weight.shape[0], weight.shape[1], embedding.padding_idx)
        scale = weight.abs().amax(dim=1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        out.weight_int8.copy_(torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        out.scale.copy_(scale)
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (for inspection; the forward pass never builds it)."""
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.weight_int8)
        return rows.to(torch.float32) * nn.functional.embedding(ids, self.scale[:, None])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row scales"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def ort_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


class OnnxClassifier(nn.Module):
    """An ONNX Runtime session that answers like a transformers classifier.

    ``model(input_ids=..., attention_mask=..., token_type_ids=...)`` with torch tensors
    returns an object whose ``.logits`` is a float32 torch tensor; ``eval()`` and
    ``training`` work as on any module. The session runs on the CPU with as many intra-op
    threads as torch has at load time (a Serve replica sets that from its CPUs).
    """

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask=None, token_type_ids=None, **_):
        given = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        }
        feeds = {}
        for name in self.input_names:
            value = given.get(name)
            if value is None:
                value = (
                    torch.ones_like(input_ids)
                    if name == "attention_mask"
                    else torch.zeros_like(input_ids)
                )
            feeds[name] = value.detach().cpu().to(torch.int64).numpy()
        (logits,) = self.session.run([self.output_name], feeds)
        return SimpleNamespace(logits=torch.from_numpy(logits).float())

    def extra_repr(self) -> str:
        return f"{self.path.name}, inputs {self.input_names}"


def quantize_weight_only(model: nn.Module, method: str) -> nn.Module:
    """int8 or int4 weight-only quantization of every Linear, with torchao, on a CUDA model.

    torchao is imported here only: it is needed on a GPU machine, not by the CPU formats.
    """
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        from lepton_ray.errors import StageError

        raise StageError(
            f"{method} needs torchao on the GPU machine ({err}); pip install torchao"
        ) from None
    config = Int8WeightOnlyConfig() if method == "int8_weight_only" else Int4WeightOnlyConfig()
    quantize_(model, config)
    return model


class CudaModel(nn.Module):
    """A model on the GPU that takes tensors on any device and answers on theirs: CPU
    tensors in (a Serve replica, a classifier's evaluation), CPU logits out; tensors already
    on the GPU (an evaluation that moves its batches to the model's device) stay there.
    A model that generates text generates through it the same way (``generate``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.device = next(model.parameters()).device

    @property
    def config(self):
        return self.model.config

    def can_generate(self) -> bool:
        check = getattr(self.model, "can_generate", None)
        return bool(check()) if callable(check) else False

    def _moved(self, inputs: dict) -> tuple[dict, torch.device]:
        given = next((v.device for v in inputs.values() if torch.is_tensor(v)), None)
        moved = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        return moved, given or torch.device("cpu")

    def forward(self, **inputs):
        moved, device = self._moved(inputs)
        out = self.model(**moved)
        return SimpleNamespace(logits=out.logits.float().to(device))

    def generate(self, **inputs):
        moved, device = self._moved(inputs)
        return self.model.generate(**moved).to(device)
