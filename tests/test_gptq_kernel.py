"""GPTQ dequantisation (kernels/gptq.py) against the format's definition and bit for bit against
gptqmodel's own TorchLinear dequantisation of layers packed by gptqmodel's own packing code
(both zero-point conventions), and torch.ops.foak.lora_linear_gptq forward and backward against
float64. The gptqmodel tests need the optional extra (scripts/install_gptq.sh); the rest do not."""

import copy

import pytest
import torch
import torch.nn as nn

import foak_compile  # noqa: F401
from foak_compile.kernels import gptq
from foak_compile.kernels import lora as lora_kernel
from foak_compile.kernels.common import use_triton
from tests.helpers import rel_err

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --- a GPTQ layer from integer codes (independent of any GPTQ library) ---------------------------


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Fields of `bits` packed into int32 words along `dim`, field k of word w = value pf·w + k."""
    pf = 32 // bits
    v = values.to(torch.int64).movedim(dim, 0)
    n = v.shape[0]
    v = torch.cat([v, v.new_zeros(-n % pf, *v.shape[1:])])  # a ragged tail packs as zeros
    v = v.reshape(-1, pf, *v.shape[1:])
    shifts = (torch.arange(pf) * bits).view(1, pf, *[1] * (v.dim() - 2))
    words = (v << shifts).sum(1) & 0xFFFFFFFF
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def _g_idx(n_in, group_size, act_order, gen):
    g = torch.arange(n_in) // (n_in if group_size == -1 else group_size)
    return (g[torch.randperm(n_in, generator=gen)] if act_order else g).to(torch.int32)


def _gptq_layer(
    n_in, n_out, bits=4, group_size=32, act_order=False, sym=False, scale_dtype=torch.float16, seed=0, zero_format=2
):
    """(qweight, qzeros, scales, g_idx, W [in, out] in float64 exactly as the format defines it)."""
    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    g_idx = _g_idx(n_in, group_size, act_order, gen)
    groups = int(g_idx.max()) + 1
    codes = torch.randint(0, maxq + 1, (n_in, n_out), generator=gen)
    zeros = (
        torch.full((groups, n_out), (maxq + 1) // 2)
        if sym
        else torch.randint(0, maxq + 1, (groups, n_out), generator=gen)
    )
    scales = (torch.rand(groups, n_out, generator=gen) * 0.02 + 0.002).to(scale_dtype)
    w = scales.double()[g_idx.long()] * (codes - zeros[g_idx.long()]).double()
    qzeros = _pack(zeros, bits, 1)
    if zero_format == 1:  # v1 stores zero − 1: one subtraction over each packed word, borrows and all
        words = qzeros.to(torch.int64) - gptq._v1_offset(bits)
        qzeros = torch.where(words < -(2**31), words + 2**32, words).to(torch.int32)
    return _pack(codes, bits, 0), qzeros, scales, g_idx, w


@pytest.mark.parametrize("bits", gptq.BITS)
@pytest.mark.parametrize("group_size,act_order", [(32, False), (64, True), (128, False), (-1, False), (32, True)])
def test_dequant_matches_the_format(bits, group_size, act_order, device):
    """W = scales·(code − zero), rounded to the scales' dtype, then to the requested dtype; the
    Triton kernel and the torch path give the same bits, ragged shapes and v1 zeros included."""
    for scale_dtype in (torch.float16, torch.bfloat16):
        for (n_in, n_out), sym, zf in (((160, 96), False, 2), ((75, 41), True, 2), ((200, 36), False, 1)):
            qw, qz, s, g, w = _gptq_layer(n_in, n_out, bits, group_size, act_order, sym, scale_dtype, zero_format=zf)
            args = [t.to(device) for t in (qw, qz, s, g)]
            assert use_triton(args[0])
            for dtype in DTYPES:
                got = gptq.dequantize(*args, bits, dtype, zf)
                want = w.to(scale_dtype).to(dtype)
                assert got.shape == (n_in, n_out) and got.dtype == dtype
                assert torch.equal(got.cpu(), want), (bits, group_size, scale_dtype, dtype, n_in, n_out, zf)
                assert torch.equal(gptq.dequantize_torch(*args, bits, dtype, zf), got)


def test_dequant_rejects_inconsistent_tensors():
    qw, qz, s, g, _ = _gptq_layer(64, 32)
    with pytest.raises(ValueError, match="bits"):
        gptq.dequantize(qw, qz, s, g, 3, torch.float16)
    with pytest.raises(ValueError, match="qweight"):
        gptq.dequantize(qw[:-1], qz, s, g, 4, torch.float16)
    with pytest.raises(ValueError, match="qzeros"):
        gptq.dequantize(qw, qz[:, :-1], s, g, 4, torch.float16)
    with pytest.raises(ValueError, match="int32"):
        gptq.dequantize(qw.long(), qz, s, g, 4, torch.float16)
    with pytest.raises(ValueError, match="zero_format"):
        gptq.dequantize(qw, qz, s, g, 4, torch.float16, 3)


# --- bit for bit against gptqmodel --------------------------------------------------------------


@pytest.fixture
def gptqmodel(monkeypatch):
    pytest.importorskip("gptqmodel")
    # gptqmodel's pure-Python packer, not its JIT-compiled C++ one (same layout, no compile in CI)
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    return TorchLinear


def _gptqmodel_layer(TorchLinear, n_in, n_out, bits, group_size, act_order, sym, seed=0):
    """A TorchLinear packed by gptqmodel from a random weight and random quantisation grid."""
    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    g_idx = _g_idx(n_in, group_size, act_order, gen)
    groups = int(g_idx.max()) + 1
    lin = nn.Linear(n_in, n_out, bias=False)
    scales = torch.rand(n_out, groups, generator=gen) * 0.02 + 0.002  # gptqmodel's [out, groups]
    zeros = (
        torch.full((n_out, groups), (maxq + 1) // 2)
        if sym
        else torch.randint(0, maxq + 1, (n_out, groups), generator=gen)
    )
    zeros[0, 0] = 0  # a v1 (zero − 1) word that borrows from its neighbour
    m = TorchLinear(
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=act_order,
        in_features=n_in,
        out_features=n_out,
        bias=False,
        pack_dtype=torch.int32,
    )
    if n_in % 32 == 0 and n_out % 32 == 0:
        m.pack(lin, scales, zeros, g_idx)  # what optimum's GPTQ quantizer calls
    else:
        m.pack_original(lin, scales, zeros, g_idx)  # the packer that takes any shape
    return m


def _gptqmodel_dequant(TorchLinear, m):
    """gptqmodel's own dequantised weight [in, out] in training and in eval mode (called through the
    class: post_init wraps the bound method in torch.compile)."""
    m.train()
    train = TorchLinear.dequantize_weight(m)
    m.eval()
    evaluated = TorchLinear.dequantize_weight(m)
    assert torch.equal(train, evaluated)
    return train


@pytest.mark.parametrize("bits", gptq.BITS)
def test_dequant_is_bit_exact_vs_gptqmodel(gptqmodel, bits, device):
    for (n_in, n_out), group_size, act_order, sym in (
        ((128, 96), 32, False, True),
        ((128, 64), 64, True, False),
        ((256, 32), 128, True, True),
        ((96, 64), -1, False, False),
        ((72, 50), 32, True, False),
    ):
        m = _gptqmodel_layer(gptqmodel, n_in, n_out, bits, group_size, act_order, sym)
        for scale_dtype in (torch.float16, torch.bfloat16):  # packed in fp16; model.to(bf16) casts them
            m = m.to(scale_dtype)
            ref = _gptqmodel_dequant(gptqmodel, m)
            args = [t.to(device) for t in (m.qweight, m.qzeros, m.scales, m.g_idx)]
            for dtype in DTYPES:  # TorchLinear casts its weight to the activation's dtype
                got = gptq.dequantize(*args, bits, dtype)
                what = (n_in, n_out, group_size, act_order, sym, scale_dtype, dtype)
                assert torch.equal(got.cpu(), ref.to(dtype)), (what, (got.cpu() != ref.to(dtype)).sum().item())


@pytest.mark.parametrize("bits", gptq.BITS)
def test_v1_zero_points_decode_like_gptqmodel_loads_them(gptqmodel, bits, device):
    """A v1 checkpoint stores zero − 1; gptqmodel converts its words when it loads one. Our
    zero_format=1 decoding of the v1 words equals gptqmodel's weight after that conversion."""
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module, convert_gptq_v2_to_v1_format_module

    m = _gptqmodel_layer(gptqmodel, 128, 64, bits, 32, True, sym=False)
    ref = _gptqmodel_dequant(gptqmodel, m)
    v1 = copy.deepcopy(m)
    convert_gptq_v2_to_v1_format_module(v1, QuantizeConfig(bits=bits))  # what gptqmodel saves as format "gptq"
    assert not torch.equal(v1.qzeros, m.qzeros)
    args = [t.to(device) for t in (v1.qweight, v1.qzeros, v1.scales, v1.g_idx)]
    for dtype in DTYPES:
        assert torch.equal(gptq.dequantize(*args, bits, dtype, zero_format=1).cpu(), ref.to(dtype))
    convert_gptq_v1_to_v2_format_module(v1, bits, torch.int32)  # what gptqmodel does when loading it
    assert torch.equal(v1.qzeros, m.qzeros)


# --- the fused op ----------------------------------------------------------------------------------


def _adapter(n_in, n_out, r, dtype, device, bias=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(r, n_in, generator=gen) / n_in**0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(n_out, r, generator=gen) / r**0.5).to(device, dtype).requires_grad_()
    bias_t = torch.randn(n_out, generator=gen).to(device, dtype).requires_grad_() if bias else None
    return a, b, bias_t


def _reference(x, w_out_in, bias, a, b, s, keep=None, p=0.0):
    xa = x if keep is None else x * keep.double() / (1.0 - p)
    y = x @ w_out_in.t() + s * (xa @ a.t()) @ b.t()
    return y if bias is None else y + bias


def _check(y, dy, x, w, bias, a, b, s, keep=None, p=0.0, tol=2e-5):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, bias, a, b)]
    xd, bd, ad, bbd = leaves
    yd = _reference(xd, w.double(), bd, ad, bbd, s, keep, p)
    yd.backward(dy.double())
    assert rel_err(y, yd) < tol
    for got, want, src, what in ((x.grad, xd.grad, x, "dx"), (a.grad, ad.grad, a, "dA"), (b.grad, bbd.grad, b, "dB")):
        assert got is not None and got.dtype == src.dtype, what
        assert rel_err(got, want) < tol, (what, rel_err(got, want))
    if bias is not None:
        assert rel_err(bias.grad, bd.grad) < tol


def _quant_args(n_in, n_out, bits, group_size, act_order, scale_dtype, device, zero_format=2):
    qw, qz, s, g, w = _gptq_layer(
        n_in, n_out, bits, group_size, act_order, scale_dtype=scale_dtype, zero_format=zero_format
    )
    return [t.to(device) for t in (qw, qz, s, g)], w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bits,group_size,act_order,bias", [(4, 32, True, True), (8, -1, False, False), (4, 64, False, False)]
)
def test_op_forward_backward_vs_float64(dtype, bits, group_size, act_order, bias, device):
    n_in, n_out, r = 96, 72, 6
    q, w = _quant_args(n_in, n_out, bits, group_size, act_order, torch.float16, device)
    a, b, bias_t = _adapter(n_in, n_out, r, dtype, device, bias)
    x = torch.randn(3, 13, n_in, dtype=dtype, device=device, requires_grad=True)
    y, t, _ = torch.ops.foak.lora_linear_gptq(x, *q, bias_t, a, b, 0.75, 0.0, bits, 2, dtype, dtype)
    assert y.shape == (3, 13, n_out) and y.dtype == dtype and t.shape == (3, 13, r)
    dy = torch.randn_like(y)
    y.backward(dy)
    # the reference multiplies the weight the layer computes with (rounded like gptqmodel's)
    _check(y, dy, x, w.to(torch.float16).to(dtype).t(), bias_t, a, b, 0.75, tol=TOL[dtype])


def test_op_fp32_activations_over_fp16_scales_and_v1_zeros(device):
    """gptqmodel packs fp16 scales; an fp32 model computes in fp32 over the fp16-rounded weight.
    A v1 (zero − 1) tensor set gives the same layer."""
    q, w = _quant_args(64, 40, 4, 32, True, torch.float16, device, zero_format=1)
    a, b, _ = _adapter(64, 40, 4, torch.float32, device)
    x = torch.randn(9, 64, device=device, requires_grad=True)
    y, t, _ = torch.ops.foak.lora_linear_gptq(x, *q, None, a, b, 2.0, 0.0, 4, 1, torch.float32, torch.float32)
    assert y.dtype == t.dtype == torch.float32
    dy = torch.randn_like(y)
    y.backward(dy)
    _check(y, dy, x, w.to(torch.float16).float().t(), None, a, b, 2.0)


def test_op_mixed_precision_adapter_and_output(device):
    """fp32 adapters on a bf16 layer (peft's default): GEMMs in bf16, adapter grads in fp32, fp32 out."""
    q, w = _quant_args(64, 48, 4, 32, False, torch.bfloat16, device)
    a, b, _ = _adapter(64, 48, 8, torch.float32, device)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
    y, _, _ = torch.ops.foak.lora_linear_gptq(x, *q, None, a, b, 2.0, 0.0, 4, 2, torch.bfloat16, torch.float32)
    assert y.dtype == torch.float32
    dy = torch.randn_like(y)
    y.backward(dy)
    assert a.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    _check(y, dy, x, w.to(torch.bfloat16).t(), None, a, b, 2.0, tol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_dropout_uses_one_mask_forward_and_backward(dtype, device):
    p, s = 0.3, 1.5
    q, w = _quant_args(65, 33, 4, 32, True, torch.float16, device)
    a, b, _ = _adapter(65, 33, 8, dtype, device)
    x = torch.randn(4, 21, 65, dtype=dtype, device=device, requires_grad=True)
    y, _, seed = torch.ops.foak.lora_linear_gptq(x, *q, None, a, b, s, p, 4, 2, dtype, dtype)
    keep = lora_kernel.dropout(torch.ones(4 * 21, 65, device=device), seed, p, torch.float32).view(x.shape) != 0
    assert 0.55 < keep.float().mean().item() < 0.85
    dy = torch.randn_like(y)
    y.backward(dy)
    _check(y, dy, x, w.to(torch.float16).to(dtype).t(), None, a, b, s, keep, p, tol=TOL[dtype])


def test_op_grads_only_where_needed_and_quantised_base_is_frozen(device):
    q, _ = _quant_args(32, 24, 4, 32, False, torch.float16, device)
    a, b, _ = _adapter(32, 24, 4, torch.float32, device)
    a.requires_grad_(False)
    x = torch.randn(5, 32, device=device)
    y, _, _ = torch.ops.foak.lora_linear_gptq(x, *q, None, a, b, 1.0, 0.0, 4, 2, torch.float32, torch.float32)
    y.sum().backward()
    assert b.grad is not None and a.grad is None
    scales = q[2].float().requires_grad_()
    y, _, _ = torch.ops.foak.lora_linear_gptq(
        x, q[0], q[1], scales, q[3], None, a, b, 1.0, 0.0, 4, 2, torch.float32, torch.float32
    )
    with pytest.raises(NotImplementedError, match="frozen"):
        y.sum().backward()


def test_op_refuses_shapes_that_do_not_chain(device):
    q, _ = _quant_args(32, 24, 4, 32, False, torch.float16, device)
    a, b, _ = _adapter(32, 24, 4, torch.float32, device)
    with pytest.raises(ValueError, match="do not chain"):
        torch.ops.foak.lora_linear_gptq(
            torch.randn(5, 31, device=device), *q, None, a, b, 1.0, 0.0, 4, 2, torch.float32, torch.float32
        )


def test_fake_impls_match_real():
    q, _ = _quant_args(32, 24, 4, 32, True, torch.float16, "cpu")
    a, b, bias = _adapter(32, 24, 4, torch.float32, "cpu", bias=True)
    args = (torch.randn(2, 5, 32, requires_grad=True), *q, bias, a, b, 0.5, 0.0, 4, 2, torch.float32, torch.bfloat16)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.foak.lora_linear_gptq.default, args, test_utils=checks)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_opaque_gptq_dequant_ops(bits, device, monkeypatch, foak_config):
    """torch.ops.foak.dequantize_gptq(_stacked), what the GPTQ LoRA ops call under CUDA graphs: the
    kernel's bits, fake impls that match, and the LoRA op the same through either route."""
    from foak_compile.ops import dequant

    n_in = int(torch.randint(40, 130, ()))
    outs = [int(v) for v in torch.randint(5, 70, (2,))]
    layers = [
        _gptq_layer(n_in, o, bits, 32, act_order=bool(i), seed=int(torch.randint(0, 999, ())))
        for i, o in enumerate(outs)
    ]
    layers = [tuple(t.to(device) for t in layer[:4]) for layer in layers]
    for layer in layers:
        args = (*layer, bits, 2, torch.bfloat16, dequant.FORWARD)
        assert torch.equal(torch.ops.foak.dequantize_gptq(*args), gptq.dequantize(*layer, bits, torch.bfloat16, 2))
        torch.library.opcheck(
            torch.ops.foak.dequantize_gptq.default, args, test_utils=("test_schema", "test_faketensor")
        )
    cols = [list(c) for c in zip(*layers)]
    stacked_args = (*cols, bits, 2, torch.bfloat16, dequant.BACKWARD)
    want = torch.cat([gptq.dequantize(*layer, bits, torch.bfloat16, 2) for layer in layers], dim=1)
    assert torch.equal(torch.ops.foak.dequantize_gptq_stacked(*stacked_args), want)
    torch.library.opcheck(
        torch.ops.foak.dequantize_gptq_stacked.default, stacked_args, test_utils=("test_schema", "test_faketensor")
    )
    x = torch.randn(3, 5, n_in, dtype=torch.bfloat16, device=device)
    a = torch.randn(4, n_in, dtype=torch.bfloat16, device=device) / 8
    b = torch.randn(outs[0], 4, dtype=torch.bfloat16, device=device) / 8
    opaque_calls = []
    for name in ("dequantize_gptq", "dequantize_gptq_stacked"):  # looked up on torch.ops.foak per call
        real = getattr(torch.ops.foak, name)
        monkeypatch.setattr(
            torch.ops.foak, name, lambda *args, _real=real, _name=name: opaque_calls.append(_name) or _real(*args)
        )
    results = []
    for opaque in (False, True):
        foak_config(opaque_dequant=opaque)
        del opaque_calls[:]
        xi, ai, bi = (t.clone().requires_grad_() for t in (x, a, b))
        y = torch.ops.foak.lora_linear_gptq(
            xi, *layers[0], None, ai, bi, 0.5, 0.0, bits, 2, torch.bfloat16, torch.bfloat16
        )[0]
        y.backward(torch.ones_like(y))
        ys = torch.ops.foak.lora_linear_gptq_siblings(
            xi.detach(),
            *cols,
            [None] * 2,
            [ai.detach()] * 2,
            [bi.detach(), torch.zeros(outs[1], 4, dtype=torch.bfloat16, device=device)],
            [0.5, 0.5],
            bits,
            2,
            torch.bfloat16,
            torch.bfloat16,
        )[0]
        results.append((y, xi.grad, ai.grad, bi.grad, ys))
        # forward and backward of the single layer, forward of the group: through the opaque ops or not at all
        assert opaque_calls == (["dequantize_gptq"] * 2 + ["dequantize_gptq_stacked"] if opaque else []), opaque_calls
    for got, want in zip(*results):
        assert torch.equal(got, want)
