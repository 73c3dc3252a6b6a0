"""The GPU itself: CUDA works, and bf16 is native and accurate enough to train in."""

import pytest
import torch

from lepton_ray.train.precision import resolve_precision

pytestmark = pytest.mark.gpu


def test_cuda_is_available_and_agrees_with_the_cpu(cuda):
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    b = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    on_gpu = (a.to(cuda) @ b.to(cuda)).cpu()
    assert torch.allclose(on_gpu, a @ b, rtol=1e-4, atol=1e-3)
    assert torch.cuda.get_device_name(cuda)


def test_bf16_matmul_is_native_and_close_to_fp32(cuda):
    precision = resolve_precision("auto", cuda)
    assert precision.name == "bf16", precision.reason  # Ampere or newer
    a = torch.randn(512, 512, device=cuda)
    b = torch.randn(512, 512, device=cuda)
    with precision.autocast():
        product = a @ b
    assert product.dtype == torch.bfloat16
    exact = a.double() @ b.double()
    error = (product.double() - exact).abs().max() / exact.abs().max()
    assert error < 2e-2, float(error)  # bf16 keeps 8 bits of mantissa
    assert resolve_precision("fp16", cuda).use_grad_scaler
