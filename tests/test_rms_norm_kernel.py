"""torch.ops.foak.rms_norm forward/backward against a float64 reference."""

import pytest
import torch

import foak_compile  # noqa: F401
from foak_compile.kernels import rms_norm as kernel
from foak_compile.kernels.common import use_triton
from tests.helpers import rel_err

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def reference(x, w, eps, mid, out):
    """float64 math; `mid` rounding is reproduced exactly as the model's cast would do it."""
    xd = x.double()
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    if mid is not None:
        n = n.to(mid).double()
    y = n if w is None else n * w.double()
    return y.to(out) if out is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 33), (67, 3000), (2, 9, 5120), (37, 128)])
def test_forward_backward_vs_float64(dtype, shape, device):
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    w = torch.randn(shape[-1], dtype=dtype, device=device) + 1
    assert use_triton(x), "kernel path must be exercised (CUDA or TRITON_INTERPRET=1)"
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = torch.ops.foak.rms_norm(xr, wr, 1e-6, dtype, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    y.backward(dy)

    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    yd = reference(xd, wd, 1e-6, None, None)
    yd.backward(dy.double())
    tol = TOL[dtype]
    assert rel_err(y, yd) < tol
    assert rel_err(xr.grad, xd.grad) < tol
    assert rel_err(wr.grad, wd.grad) < tol
    assert xr.grad.dtype == dtype and wr.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mid_rounding_matches_llama_eager_exactly(dtype, device):
    """HF Llama rounds the normalised value to the input dtype before the weight multiply."""
    x = torch.randn(19, 77, dtype=dtype, device=device)
    w = torch.randn(77, dtype=dtype, device=device)
    xf = x.float()
    eager = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    ours = torch.ops.foak.rms_norm(x, w, 1e-5, dtype, dtype)
    # identical up to rsqrt's last fp32 bit flipping a rounding of n (then scaled by w) on few elements
    diff = (ours.float() - eager.float()).abs()
    ulp = (eager.float().abs() + w.float().abs()) * torch.finfo(dtype).eps
    assert (diff <= 2 * ulp + 1e-6).all()
    assert (diff == 0).float().mean() > 0.97


def test_no_weight_and_mixed_dtypes(device):
    x = torch.randn(5, 7, 40, dtype=torch.bfloat16, device=device)
    y = torch.ops.foak.rms_norm(x, None, 1e-6, None, torch.float32)
    assert y.dtype == torch.float32
    assert rel_err(y, reference(x, None, 1e-6, None, None)) < 1e-6
    w = torch.randn(40, dtype=torch.float32, device=device, requires_grad=True)
    y = torch.ops.foak.rms_norm(x, w, 1e-6, torch.bfloat16, torch.float32)
    assert rel_err(y, reference(x, w.detach(), 1e-6, torch.bfloat16, None)) < 1e-2  # one bf16 ulp of n
    y.sum().backward()
    assert w.grad.dtype == torch.float32


def test_non_contiguous_input(device):
    base = torch.randn(48, 6, 10, dtype=torch.float32, device=device)
    x = base.transpose(0, 2)  # last dim has stride 60
    w = torch.randn(48, device=device)
    assert not x.is_contiguous()
    xr = x.clone().requires_grad_()
    y = torch.ops.foak.rms_norm(xr, w, 1e-6, None, torch.float32)
    torch.testing.assert_close(y, reference(x, w, 1e-6, None, torch.float32))
    dy = torch.randn(6, 10, 48, device=device).transpose(0, 1)  # a non-contiguous gradient too
    y.backward(dy)
    xd = x.double().requires_grad_()
    reference(xd, w, 1e-6, None, None).backward(dy.double())
    assert rel_err(xr.grad, xd.grad) < 2e-5


def test_grads_only_where_needed(device):
    x = torch.randn(9, 50, device=device, requires_grad=True)
    w = torch.randn(50, device=device)  # frozen, as in LoRA training
    torch.ops.foak.rms_norm(x, w, 1e-6, None, torch.float32).sum().backward()
    assert x.grad is not None and w.grad is None
    dx, dw = kernel.rms_norm_backward(torch.ones(9, 50, device=device), x.detach(), w, 1e-6, None, False, True)
    assert dx is None and dw.shape == (50,)


def test_torch_path_agrees_with_kernel(device):
    """The fallback for devices without Triton gives the kernel's numbers."""
    x = torch.randn(13, 96, dtype=torch.bfloat16, device=device)
    w = torch.randn(96, dtype=torch.bfloat16, device=device)
    torch.testing.assert_close(
        kernel.rms_norm_torch(x, w, 1e-6, torch.bfloat16, torch.bfloat16),
        kernel.rms_norm_forward(x, w, 1e-6, torch.bfloat16, torch.bfloat16),
    )
    dy = torch.randn_like(x)
    for a, b in zip(
        kernel.rms_norm_torch_backward(dy, x, w, 1e-6, torch.bfloat16, True, True),
        kernel.rms_norm_backward(dy, x, w, 1e-6, torch.bfloat16, True, True),
    ):
        assert rel_err(a, b) < 1e-2


def test_fake_impl_matches_real():
    torch.library.opcheck(
        torch.ops.foak.rms_norm.default,
        (
            torch.randn(3, 17, requires_grad=True),
            torch.randn(17, requires_grad=True),
            1e-6,
            torch.bfloat16,
            torch.float32,
        ),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_outputs_are_contiguous_like_the_fake(path, device):
    """Fake and real strides must agree, or code after the op (a .view) breaks only at run time."""
    x = torch.randn(4, 6, 40, device=device).transpose(0, 1)
    w = torch.randn(40, device=device)
    if path == "kernel":
        y = kernel.rms_norm_forward(x, w, 1e-6, None, torch.float32)
        dx, _ = kernel.rms_norm_backward(torch.randn_like(x), x, w, 1e-6, None, True, False)
    else:
        y = kernel.rms_norm_torch(x, w, 1e-6, None, torch.float32)
        dx, _ = kernel.rms_norm_torch_backward(torch.randn_like(x), x, w, 1e-6, None, True, False)
    assert y.is_contiguous() and dx.is_contiguous()
