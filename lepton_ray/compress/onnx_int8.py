"""ONNX export of a float classifier and ONNX Runtime int8 quantization of the graph.

The export goes through ``torch.onnx.export(dynamo=True)`` (the TorchScript exporter is
deprecated), with batch and sequence dimensions dynamic. Before quantizing, the float graph
is run by ONNX Runtime on real batches and must give the torch model's logits (within
``EXPORT_ATOL``): an export that changes what the model computes is refused, not shipped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lepton_ray.errors import StageError

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EXPORT_ATOL = 1e-3


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.model(**inputs).logits


def model_inputs(model: torch.nn.Module) -> tuple[str, ...]:
    """The encoder inputs this model takes (BERT: all three; DistilBERT: no token types)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return tuple(name for name in INPUTS if name in params)


@contextlib.contextmanager
def _quiet():
    """The exporter reports each step on stdout and warns about torch internals."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(model: torch.nn.Module, example: dict[str, torch.Tensor], path: Path) -> Path:
    """Write ``model`` (float, eval mode) as one self-contained ONNX file with dynamic
    batch and sequence axes; ``example`` is one tokenized batch."""
    names = model_inputs(model)
    if names[:2] != INPUTS[:2]:
        raise StageError(f"ONNX export needs a model that takes {INPUTS[:2]}, not {names}")
    ids = example["input_ids"].to(torch.int64)
    defaults = {"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    tensors = tuple(
        ids if n == "input_ids" else example.get(n, defaults[n]).to(torch.int64) for n in names
    )
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("sequence", min=1, max=int(model.config.max_position_embeddings))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet():
            torch.onnx.export(
                _LogitsOnly(model.eval()),
                tensors,
                str(path),
                input_names=list(names),
                output_names=["logits"],
                dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                dynamo=True,
                external_data=False,
                optimize=True,
            )
    except Exception as err:  # noqa: BLE001 - the exporter raises many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StageError(f"ONNX export of the model failed: {first}") from None
    return path


def check_export(
    model: torch.nn.Module, path: Path, batches: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """Run the float ONNX graph on ``batches`` beside the torch model; refuse a mismatch.

    Returns ``max_abs_logit_diff`` and ``prediction_agreement`` (share of equal argmax).
    """
    from lepton_ray.compress.modules import OnnxClassifier

    session = OnnxClassifier(path)
    worst, same, total = 0.0, 0, 0
    with torch.inference_mode():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            ref = model(**inputs).logits.float()
            got = session(**inputs).logits
            worst = max(worst, float((ref - got).abs().max()))
            same += int((ref.argmax(-1) == got.argmax(-1)).sum())
            total += len(ref)
    agreement = same / total if total else 1.0
    if worst > EXPORT_ATOL:
        raise StageError(
            f"ONNX export changed the model: logits differ by up to {worst:.2e} "
            f"(> {EXPORT_ATOL:g}) from torch's on {total} rows"
        )
    return {"max_abs_logit_diff": worst, "prediction_agreement": agreement}


QUANTIZED_OPS = ("MatMul", "Gemm", "Gather")
"""The ops ONNX Runtime's dynamic int8 quantizes here (Gather: the embedding tables)."""


def _module_of(node) -> str | None:
    """The module path (as in ``model.named_modules()``) that ``node`` computes.

    The dynamo exporter records each node's module scopes, outermost first, ending with the
    op itself: ``['', 'model', 'model.classifier', 'linear_13']`` (``model`` is the
    ``_LogitsOnly`` wrapper's attribute). Weight names cannot say it: most are ``val_<n>``.
    """
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            if len(scopes) >= 2 and scopes[-2].startswith("model."):
                return scopes[-2].removeprefix("model.")
    return None


def float_linear_nodes(path: Path, keep_float: Sequence[str]) -> list[str]:
    """Names of the MatMul/Gemm/Gather nodes that compute the modules in ``keep_float``
    (names, or name prefixes: the rule of ``quantize_dynamic_int8``).

    ONNX Runtime's dynamic quantizer first rewrites each Gemm as a MatMul named
    ``<name>_MatMul`` (and an Add), and excludes nodes by their rewritten names: both names
    are returned.
    """
    import onnx

    if not keep_float:
        return []
    proto = onnx.load(str(path), load_external_data=False)
    out = []
    for node in proto.graph.node:
        module = _module_of(node) if node.op_type in QUANTIZED_OPS else None
        if module is None or not any(module == k or module.startswith(f"{k}.") for k in keep_float):
            continue
        out += [node.name, f"{node.name}_MatMul"] if node.op_type == "Gemm" else [node.name]
    return out


def quantize_onnx_int8(
    fp32_path: Path,
    int8_path: Path,
    per_channel: bool = True,
    keep_float: Sequence[str] = (),
    embeddings: bool = True,
) -> Path:
    """ONNX Runtime dynamic int8: int8 weights (per channel), uint8 activations quantized
    per batch; MatMuls of ``keep_float`` modules stay float, and the embedding ``Gather``
    tables become uint8 where ``embeddings``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = [op for op in QUANTIZED_OPS if embeddings or op != "Gather"]
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        quantize_dynamic(
            str(fp32_path),
            str(int8_path),
            op_types_to_quantize=ops,
            per_channel=per_channel,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=float_linear_nodes(fp32_path, keep_float),
            extra_options={"MatMulConstBOnly": True},
        )
    return int8_path
