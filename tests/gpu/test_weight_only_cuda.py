"""GPU weight-only quantization (torchao), as compress and serve use it."""

import pytest
import torch

from lepton_ray.compress.modules import CudaModel, quantize_weight_only
from lepton_ray.tasks.classification_eval import collate
from tests.gpu.conftest import learnable_rows, tiny_classifier

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["int8_weight_only", "int4_weight_only"])
def test_weight_only_quantization_keeps_the_outputs(cuda, method):
    pytest.importorskip("torchao", reason="torchao is optional: GPU weight-only formats only")
    rows = learnable_rows(32, seed=4)
    batch = collate(rows.sequences(range(32)), None, 0)
    reference = tiny_classifier(seed=5, hidden_size=128, intermediate_size=256)
    reference = reference.to(cuda, torch.bfloat16).eval()
    quantized = tiny_classifier(seed=5, hidden_size=128, intermediate_size=256)
    quantized = quantize_weight_only(quantized.to(cuda, torch.bfloat16).eval(), method)
    dense = quantized.bert.encoder.layer[0].attention.self.query.weight
    assert type(dense) is not torch.nn.Parameter  # a torchao quantized tensor now
    with torch.inference_mode():
        expected = reference(**{k: v.to(cuda) for k, v in batch.items()}).logits.float().cpu()
        served = CudaModel(quantized)(**batch).logits  # CPU tensors in, CPU logits out
    assert served.device.type == "cpu" and served.dtype == torch.float32
    tolerance = 0.05 if method == "int8_weight_only" else 0.25
    scale = expected.abs().max()
    assert (served - expected).abs().max() / scale < tolerance
