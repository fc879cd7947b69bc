"""torch.ops.foak.rope / rope_one forward and backward against a float64 reference and eager HF."""

import pytest
import torch

import foak_compile  # noqa: F401
from foak_compile.kernels import rope as kernel
from foak_compile.kernels.common import use_triton
from tests.helpers import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
B, S, HQ, HK = 2, 13, 4, 2


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def hf_rope(x, cos, sin, dim):
    """HF's apply_rotary_pos_emb for one tensor, in whatever dtype its inputs have."""
    cos, sin = cos.unsqueeze(dim), sin.unsqueeze(dim)
    return x * cos + rotate_half(x) * sin


def cos_sin(positions, d, dtype, device, base=10000.0):
    """HF's rotary table gathered at `positions` [B or 1, S]: [B or 1, S, d] cos and sin."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    f = positions[..., None].float() * inv
    emb = torch.cat((f, f), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make(heads, d, dtype, device, layout, scale=2.0):
    """q/k-like tensor in `layout` 1 ([B, H, S, D], transposed from [B, S, H, D] like HF) or 2."""
    t = (torch.randn(B, S, heads, d, device=device) * scale).to(dtype)
    return t.transpose(1, 2) if layout == 1 else t


def random_positions(device):
    return torch.randint(0, 500, (B, S), device=device)


def check_pair(q, k, cos, sin, dim, out_dtype=None):
    """Forward and backward of foak.rope against float64, and bit-for-bit against eager for fp32/half."""
    assert use_triton(q), "kernel path must be exercised (CUDA or TRITON_INTERPRET=1)"
    qr, kr = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qe, ke = torch.ops.foak.rope(qr, kr, cos, sin, dim)
    out_dtype = out_dtype or q.dtype
    assert qe.dtype == ke.dtype == out_dtype and qe.shape == q.shape and ke.shape == k.shape
    gq, gk = torch.randn_like(qe), torch.randn_like(ke)
    torch.autograd.backward((qe, ke), (gq, gk))
    assert qr.grad.dtype == q.dtype and kr.grad.dtype == k.dtype

    qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
    cd, sd = cos.double(), sin.double()
    rq, rk = hf_rope(qd, cd, sd, dim), hf_rope(kd, cd, sd, dim)
    torch.autograd.backward((rq, rk), (gq.double(), gk.double()))
    tol = max(TOL[q.dtype], TOL[cos.dtype])
    for got, want in ((qe, rq), (ke, rk), (qr.grad, qd.grad), (kr.grad, kd.grad)):
        assert rel_err(got, want) < tol

    # eager in the inputs' own dtypes rounds each product; the kernel reproduces that exactly
    qx, kx = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    ex, ek = hf_rope(qx, cos, sin, dim), hf_rope(kx, cos, sin, dim)
    torch.autograd.backward((ex, ek), (gq, gk))
    exact = q.dtype != torch.float32 and out_dtype != torch.float32  # fp32 may differ by an FMA
    cmp = (
        (lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0))
        if exact
        else (lambda a, b: torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6))
    )
    for got, want in ((qe, ex), (ke, ek), (qr.grad, qx.grad), (kr.grad, kx.grad)):
        cmp(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [1, 2])
def test_dtypes_layouts_gqa(dtype, layout, device):
    q, k = make(HQ, 64, dtype, device, layout), make(HK, 64, dtype, device, layout)
    cos, sin = cos_sin(random_positions(device), 64, dtype, device)
    check_pair(q, k, cos, sin, layout)


@pytest.mark.parametrize("d", [18, 80, 96, 128, 256])
def test_head_dims(d, device):
    q, k = make(3, d, torch.float32, device, 1), make(1, d, torch.float32, device, 1)
    cos, sin = cos_sin(random_positions(device), d, torch.float32, device)
    check_pair(q, k, cos, sin, 1)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_fp32_cos_sin_with_half_activations_promote_to_fp32(q_dtype, device):
    q, k = make(HQ, 64, q_dtype, device, 1), make(HK, 64, q_dtype, device, 1)
    cos, sin = cos_sin(random_positions(device), 64, torch.float32, device)
    check_pair(q, k, cos, sin, 1, out_dtype=torch.float32)  # grads still come back in q_dtype


def test_cos_sin_broadcast_over_batch_and_strided(device):
    """cos/sin with batch 1, and non-contiguous cos/sin (a slice of a wider table)."""
    q, k = make(HQ, 64, torch.float32, device, 1), make(HK, 64, torch.float32, device, 1)
    cos, sin = cos_sin(torch.arange(S, device=device)[None] * 3, 64, torch.float32, device)
    check_pair(q, k, cos, sin, 1)
    wide_c, wide_s = torch.randn(1, S, 160, device=device), torch.randn(1, S, 160, device=device)
    check_pair(q, k, wide_c[..., 7:71], wide_s[..., 90:154], 1)


def test_non_contiguous_q_k(device):
    """Slices of a fused projection ([B, S, H, 3D] → q = [..., :D]) and a permuted head order."""
    d = 32
    qkv = torch.randn(B, S, HQ, 3 * d, device=device)
    q = qkv[..., :d].transpose(1, 2)
    k = torch.randn(B, HK, d, S, device=device).transpose(2, 3)  # stride(-1) != 1
    cos, sin = cos_sin(random_positions(device), d, torch.float32, device)
    assert not q.is_contiguous() and k.stride(-1) != 1
    check_pair(q, k, cos, sin, 1)


def test_general_cos_sin_backward_is_the_transpose(device):
    """Random cos/sin whose halves differ: the backward must be the transpose, not a −sin rotation."""
    q, k = make(HQ, 24, torch.float32, device, 2), make(HK, 24, torch.float32, device, 2)
    cos, sin = torch.randn(B, S, 24, device=device), torch.randn(B, S, 24, device=device)
    check_pair(q, k, cos, sin, 2)


@pytest.mark.slow
@pytest.mark.parametrize("tile", [(1, 1, 1), (2, 4, 2), (4, 2, 4), (16, 8, 8)])
@pytest.mark.parametrize("layout", [1, 2])
def test_tiles_with_token_and_head_tails(tile, layout, device, monkeypatch):
    """Tiles that do not divide the tokens (B·S = 26) or the heads (6 q, 3 kv): masked tails."""
    bt, bh, nw = tile
    monkeypatch.setattr(kernel, "_tile", lambda half, h1, h2: (bt, bh, max(1, 1 << (half - 1).bit_length()), nw))
    q, k = make(6, 32, torch.bfloat16, device, layout), make(3, 32, torch.bfloat16, device, layout)
    cos, sin = cos_sin(random_positions(device), 32, torch.bfloat16, device)
    check_pair(q, k, cos, sin, layout)
    x = make(6, 20, torch.float32, device, layout)  # head_dim not a power of two: masked half-rows
    c, s = cos_sin(random_positions(device), 20, torch.float32, device)
    torch.testing.assert_close(torch.ops.foak.rope_one(x, c, s, layout), hf_rope(x, c, s, layout), rtol=2e-6, atol=2e-6)


def test_int64_offsets(device, monkeypatch):
    """The int64 index path (taken for tensors spanning 2**31 elements) computes the same values."""
    q, k = make(HQ, 64, torch.bfloat16, device, 1), make(HK, 64, torch.bfloat16, device, 1)
    cos, sin = cos_sin(random_positions(device), 64, torch.bfloat16, device)
    monkeypatch.setattr(kernel, "_needs_int64", lambda *layouts: True)
    check_pair(q, k, cos, sin, 1)
    monkeypatch.undo()
    assert kernel._needs_int64(((2, 1, 2**30 + 1, 2), (1, 1, 2, 1)))  # spans 2**31 + 2 elements
    assert not kernel._needs_int64(((2, 1, 2**29, 2), (1, 1, 2, 1)), (tuple(q.shape), q.stride()))


@pytest.mark.parametrize("kind", ["packed", "left_padded"])
def test_position_ids(kind, device):
    """cos/sin gathered per token: sequences restarting mid-row, and left padding."""
    if kind == "packed":
        pos = torch.tensor([list(range(5)) + list(range(8)), list(range(9)) + list(range(4))], device=device)
    else:
        mask = torch.ones(B, S, dtype=torch.long, device=device)
        mask[0, :4] = 0
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # HF's position_ids for left padding
    q, k = make(HQ, 64, torch.bfloat16, device, 1), make(HK, 64, torch.bfloat16, device, 1)
    cos, sin = cos_sin(pos, 64, torch.bfloat16, device)
    check_pair(q, k, cos, sin, 1)


def test_rope_one(device):
    x = make(HQ, 40, torch.bfloat16, device, 2).requires_grad_()
    cos, sin = cos_sin(random_positions(device), 40, torch.bfloat16, device)
    y = torch.ops.foak.rope_one(x, cos, sin, 2)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    xe = x.detach().clone().requires_grad_()
    ye = hf_rope(xe, cos, sin, 2)
    (dxe,) = torch.autograd.grad(ye, xe, g)
    torch.testing.assert_close(y, ye, rtol=0, atol=0)
    torch.testing.assert_close(dx, dxe, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backward", [False, True])
def test_torch_path(dtype, backward, device):
    """The fallback formula (CPU without the interpreter, other dtypes) agrees with eager autograd."""
    x = make(HQ, 20, dtype, device, 1).requires_grad_()
    cos, sin = torch.randn(1, S, 20, device=device, dtype=dtype), torch.randn(1, S, 20, device=device, dtype=dtype)
    y = hf_rope(x, cos, sin, 1)
    if backward:
        g = torch.randn_like(y)
        (want,) = torch.autograd.grad(y, x, g)
        got = kernel.rope_torch(g, cos, sin, 1, dtype, backward=True)
    else:
        want, got = y, kernel.rope_torch(x.detach(), cos, sin, 1, dtype)
    exact = dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)


@pytest.mark.parametrize("layout", [1, 2])
def test_grads_come_back_in_the_inputs_layout(layout, device):
    """Upstream grads in another layout (eager attention hands back contiguous [B, H, S, D]):
    dq, dk are written in q's and k's layout, so AccumulateGrad (here) or the backward of HF's
    view/transpose (in a model) copies nothing, and the values still match eager's exactly."""
    q, k = make(HQ, 64, torch.bfloat16, device, layout), make(HK, 64, torch.bfloat16, device, layout)
    cos, sin = cos_sin(random_positions(device), 64, torch.bfloat16, device)
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()  # clone keeps the transposed layout
    qe, ke = torch.ops.foak.rope(qr, kr, cos, sin, layout)

    def other_layout(t):  # contiguous for HF's transposed q/k, transposed for contiguous ones
        if not t.is_contiguous():
            return torch.randn(t.shape, device=device).bfloat16()
        return torch.randn(t.transpose(1, 2).shape, device=device).bfloat16().transpose(1, 2)

    gq, gk = other_layout(qe), other_layout(ke)
    assert gq.stride() != q.stride() and gk.stride() != k.stride()
    dq, dk = torch.autograd.grad((qe, ke), (qr, kr), (gq, gk))
    assert dq.stride() == q.stride() and dk.stride() == k.stride()
    qx, kx = q.clone().requires_grad_(), k.clone().requires_grad_()
    want = torch.autograd.grad((hf_rope(qx, cos, sin, layout), hf_rope(kx, cos, sin, layout)), (qx, kx), (gq, gk))
    torch.testing.assert_close(dq, want[0], rtol=0, atol=0)
    torch.testing.assert_close(dk, want[1], rtol=0, atol=0)
    (dx,) = torch.autograd.grad(torch.ops.foak.rope_one(qr, cos, sin, layout), qr, gq)
    assert dx.stride() == q.stride()
    torch.testing.assert_close(dx, want[0], rtol=0, atol=0)


def test_fake_kernels_and_autograd_registration(device):
    q, k = make(HQ, 16, torch.float32, device, 1), make(HK, 16, torch.float32, device, 1)
    cos, sin = cos_sin(random_positions(device), 16, torch.float32, device)
    q.requires_grad_(), k.requires_grad_()
    torch.library.opcheck(torch.ops.foak.rope.default, (q, k, cos, sin, 1))
    torch.library.opcheck(torch.ops.foak.rope_one.default, (k, cos, sin, 1))
    g = torch.randn_like(q.detach())
    torch.library.opcheck(torch.ops.foak.rope_backward.default, (g, None, cos, sin, 1, torch.bfloat16, None))
    torch.library.opcheck(
        torch.ops.foak.rope_backward.default,
        (g.contiguous(), k.detach(), cos, sin, 1, torch.bfloat16, torch.float32, list(q.stride()), list(k.stride())),
    )


def test_bad_shapes_raise(device):
    q = make(HQ, 16, torch.float32, device, 1)
    cos, sin = cos_sin(random_positions(device), 16, torch.float32, device)
    with pytest.raises(ValueError):
        torch.ops.foak.rope_one(q, cos[:, :5], sin[:, :5], 1)  # S mismatch
    with pytest.raises(ValueError):
        torch.ops.foak.rope_one(q, cos, sin, 2)  # wrong layout: S lands on the head dim
    with pytest.raises(ValueError):
        torch.ops.foak.rope_one(make(HQ, 15, torch.float32, device, 1), cos[..., :15], sin[..., :15], 1)
    with pytest.raises(ValueError):
        torch.ops.foak.rope_one(q[0], cos, sin, 1)  # not 4-D
    # q and k of different batch sizes, each valid with a batch-1 cos/sin (eager broadcasts): one launch
    # would walk q's tokens for k as well
    k = make(HK, 16, torch.float32, device, 1)
    with pytest.raises(ValueError, match="same batch"):
        torch.ops.foak.rope(q[:1], k, cos[:1], sin[:1], 1)
    with pytest.raises(ValueError, match="same batch"):
        torch.ops.foak.rope(q, k[:1], cos[:1], sin[:1], 1)


def test_cos_sin_grad_is_refused(device):
    q = make(HQ, 16, torch.float32, device, 1)
    cos, sin = cos_sin(random_positions(device), 16, torch.float32, device)
    cos.requires_grad_()
    y = torch.ops.foak.rope_one(q, cos, sin, 1)
    with pytest.raises(NotImplementedError):
        y.sum().backward()
