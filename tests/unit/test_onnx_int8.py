"""ONNX export, the export check, ONNX Runtime int8 quantization and the graph safety check
of a loaded onnx_int8 artifact, on a tiny random BERT (one export for the module)."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
import torch
from onnx import helper

from lepton_ray.artifacts import ModelMeta, load_tokenizer
from lepton_ray.compress.formats import ONNX_FILE, load_model_artifact
from lepton_ray.compress.onnx_int8 import EXPORT_ATOL, check_export, float_linear_nodes
from lepton_ray.compress.quantize import build_compressed
from lepton_ray.config import validate_experiment
from lepton_ray.errors import StageError
from tests.conftest import smoke_config
from tests.unit.test_compress_formats import LABELS, TASK, tiny_bert

TEXTS = ["the lamp works", "it broke at once , sadly", "fine"]
LONGER = ["a much longer review that runs on and on about a lamp that was , in the end , fine"]
KEEP = ["classifier", "bert.encoder.layer.1.output.dense", "bert.embeddings.token_type_embeddings"]
"""compress.keep_float of the build: the head, one encoder Linear, one embedding table."""
INT8_ATOL = 5e-3
"""int8 logits within this of the float model's (the tiny model's logits are about 0.05)."""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``build_compressed("onnx_int8", ...)`` as compress runs it: the float graph exported
    and checked, then quantized into an artifact folder."""
    tmp = tmp_path_factory.mktemp("onnx")
    tokenizer = load_tokenizer("minilm")
    source = tmp / "reviews.csv"
    source.write_text("review,sentiment\na,pos\nb,neg\n")
    cfg = validate_experiment(
        smoke_config(tmp, source, compress={"method": "onnx_int8", "keep_float": KEEP})
    )
    model = tiny_bert()
    # Two shapes: the graph's batch and sequence axes are dynamic.
    batches = [dict(tokenizer(t, padding=True, return_tensors="pt")) for t in (TEXTS, LONGER)]
    meta = ModelMeta(TASK, LABELS, "minilm", 32, weights="full")
    folder = tmp / "onnx_int8"
    lines: list[str] = []
    details = build_compressed(
        "onnx_int8", model, tokenizer, meta, cfg, folder, [], batches, log=lines.append
    )
    return {
        "model": model,
        "folder": folder,
        "fp32": tmp / "onnx_int8-fp32" / ONNX_FILE,
        "batches": batches,
        "details": details,
        "lines": lines,
    }


def _logits(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits.float()


def test_the_int8_graph_answers_as_the_torch_model_does(built):
    assert built["details"]["export_max_abs_logit_diff"] <= EXPORT_ATOL
    assert any("ONNX export checked on validation rows" in line for line in built["lines"])
    loaded, _, meta = load_model_artifact(built["folder"])
    assert meta.weights == "onnx_int8" and meta.extra["quantization"] == "onnx_int8"
    for batch in built["batches"]:
        ref, got = _logits(built["model"], batch), _logits(loaded, batch)
        assert got.shape == ref.shape == (len(batch["input_ids"]), len(LABELS))
        assert float((ref - got).abs().max()) <= INT8_ATOL
        assert not torch.equal(ref, got)  # it is int8, not the float graph again


def test_the_int8_graph_is_int8_except_the_modules_kept_float(built):
    fp32 = onnx.load(str(built["fp32"])).graph
    int8 = onnx.load(str(built["folder"] / ONNX_FILE)).graph
    kept = {k: float_linear_nodes(built["fp32"], [k]) for k in KEEP}
    assert all(kept.values()), kept  # each module found in the exported graph
    # The quantizer rewrites a Gemm as <name>_MatMul: the head is that MatMul, float.
    nodes = {n.name: n for n in int8.node}
    present = [nodes[name] for names in kept.values() for name in names if name in nodes]
    assert sorted(n.op_type for n in present) == ["Gather", "MatMul", "MatMul"]
    weights = {t.name: t.data_type for t in int8.initializer}
    for node in present:
        table = node.input[0] if node.op_type == "Gather" else node.input[1]
        assert weights[table] == onnx.TensorProto.FLOAT, node.name
    # Every other Linear (a MatMul on a constant weight, or a Gemm) became MatMulInteger.
    constants = {t.name for t in fp32.initializer}
    kept_names = {name for names in kept.values() for name in names}
    linears = [
        n.name
        for n in fp32.node
        if (n.op_type == "Gemm" or (n.op_type == "MatMul" and n.input[1] in constants))
        and n.name not in kept_names
    ]
    ops = [n.op_type for n in int8.node]
    assert len(linears) == 2 * 6 - 1 + 1  # 6 per encoder layer, one kept; the pooler
    assert ops.count("MatMulInteger") == len(linears)
    assert not [name for name in linears if name in nodes]
    assert ops.count("DequantizeLinear") == 2  # word and position tables int8, token types not
    assert (built["folder"] / ONNX_FILE).stat().st_size < built["fp32"].stat().st_size / 3


def test_the_export_check_refuses_a_graph_that_computes_something_else(built, tmp_path):
    model, batches = built["model"], built["batches"]
    assert check_export(model, built["fp32"], batches)["prediction_agreement"] == 1.0
    with pytest.raises(StageError, match="ONNX export changed the model"):
        check_export(tiny_bert(seed=1), built["fp32"], batches)  # another model's graph
    # The same graph with its head zeroed: every logit 0, refused against the model it
    # claims to be, by the largest of the model's logits.
    proto = onnx.load(str(built["fp32"]))
    head = next(t for t in proto.graph.initializer if t.name.endswith("classifier.weight"))
    zeros = onnx.numpy_helper.to_array(head) * 0
    head.CopyFrom(onnx.numpy_helper.from_array(zeros, head.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    largest = max(float(_logits(model, b).abs().max()) for b in batches)
    with pytest.raises(StageError, match=f"logits differ by up to {largest:.2e} "):
        check_export(model, tampered, batches)


def _tampered_artifact(built, tmp_path: Path, change) -> Path:
    folder = tmp_path / "artifact"
    shutil.copytree(built["folder"], folder)
    proto = onnx.load(str(folder / ONNX_FILE))
    change(proto.graph)
    onnx.save(proto, str(folder / ONNX_FILE))
    return folder


def _foreign_op(graph) -> None:
    graph.node.append(helper.make_node("Exec", ["input_ids"], ["pwned"], domain="ai.evil"))


def _foreign_op_in_a_branch(graph) -> None:
    branch = helper.make_graph(
        [helper.make_node("Exec", ["input_ids"], ["y"], domain="ai.evil")],
        "then",
        [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT64, None)],
    )
    cond = helper.make_tensor("always", onnx.TensorProto.BOOL, [], [True])
    graph.initializer.append(cond)
    graph.node.append(
        helper.make_node("If", ["always"], ["z"], then_branch=branch, else_branch=branch)
    )


def _external_weight(graph) -> None:
    tensor = graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="/etc/hostname")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_foreign_op, "operator Exec of domain 'ai.evil'"),
        (_foreign_op_in_a_branch, "operator Exec of domain 'ai.evil'"),
        (_external_weight, "refers to external data"),
    ],
)
def test_the_graph_safety_check_refuses_an_unsafe_graph(built, tmp_path, change, message):
    folder = _tampered_artifact(built, tmp_path, change)
    with pytest.raises(StageError, match=message):
        load_model_artifact(folder)


def test_a_graph_whose_outputs_do_not_match_the_labels_is_refused(built, tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(built["folder"], folder)
    meta = ModelMeta.load(folder)
    meta.labels = ["neg", "neutral", "pos"]
    meta.save(folder)
    with pytest.raises(StageError, match="does not match 3 labels"):
        load_model_artifact(folder)
    assert load_model_artifact(built["folder"])[2].labels == LABELS  # the original loads
