"""torch.ops.foak.lora_linear / lora_linear_4bit against float64 references, the 4-bit dequant
kernel bit for bit against bitsandbytes, and the seeded LoRA dropout."""

import pytest
import torch

import foak_compile  # noqa: F401
from foak_compile.kernels import bnb4
from foak_compile.kernels import lora as kernel
from foak_compile.kernels.common import use_triton
from tests.helpers import rel_err

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _layer(out_f, in_f, r, dtype, device, bias=False, adapter_dtype=None):
    adt = adapter_dtype or dtype
    w = torch.randn(out_f, in_f, dtype=dtype, device=device) / in_f**0.5
    b = torch.randn(out_f, dtype=dtype, device=device) if bias else None
    a = torch.randn(r, in_f, dtype=adt, device=device) / in_f**0.5
    bb = torch.randn(out_f, r, dtype=adt, device=device) / r**0.5  # non-zero: the adapter must count
    return w, b, a, bb


def _reference(x, w, bias, a, b, s, keep=None, p=0.0):
    """float64 forward; autograd gives the float64 gradients."""
    xa = x if keep is None else x * keep.double() / (1.0 - p)
    y = x @ w.double().t() + s * (xa @ a.t()) @ b.t()
    return y if bias is None else y + bias


def _leaves(*ts):
    return [t.detach().double().requires_grad_() if t is not None else None for t in ts]


def _check_against_reference(y, dy, x, w, bias, a, b, s, keep=None, p=0.0, tol=2e-5):
    xd, bd, ad, bbd = _leaves(x, bias, a, b)
    yd = _reference(xd, w, bd, ad, bbd, s, keep, p)
    yd.backward(dy.double())
    assert rel_err(y, yd) < tol
    for got, want, what in ((x.grad, xd.grad, "dx"), (a.grad, ad.grad, "dA"), (b.grad, bbd.grad, "dB")):
        assert got is not None and got.dtype == {"dx": x, "dA": a, "dB": b}[what].dtype, what
        assert rel_err(got, want) < tol, (what, rel_err(got, want))
    if bias is not None:
        assert rel_err(bias.grad, bd.grad) < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [((3, 37, 53), 29, 8), ((61, 67), 45, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_forward_backward_vs_float64(dtype, shape, bias, device):
    xs, out_f, r = shape
    x = torch.randn(xs, dtype=dtype, device=device).requires_grad_()
    w, bb, a, b = _layer(out_f, xs[-1], r, dtype, device, bias)
    if bb is not None:
        bb.requires_grad_()
    a.requires_grad_(), b.requires_grad_()
    y, t, _ = torch.ops.foak.lora_linear(x, w, bb, a, b, 1.75, 0.0, dtype)
    assert y.shape == (*xs[:-1], out_f) and y.dtype == dtype and t.shape == (*xs[:-1], r)
    dy = torch.randn_like(y)
    y.backward(dy)
    _check_against_reference(y, dy, x, w, bb, a, b, 1.75, tol=TOL[dtype])


def _quantized(out_f, in_f, dtype, quant_type, nested, blocksize=64, device="cpu"):
    """(packed weight, quant state, dequantised weight) from bitsandbytes itself."""
    import bitsandbytes.functional as BF

    w = torch.randn(out_f, in_f, dtype=dtype, device=device) / in_f**0.5
    q, st = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    with torch.compiler.set_stance("force_eager"):  # bitsandbytes' odd-shape fallback is torch.compile'd
        ref = BF.dequantize_4bit(q, st)
    return q, st, ref


def _state_args(st):
    if st.nested:
        return st.absmax, st.state2.absmax, st.state2.code, st.offset, st.state2.blocksize
    return st.absmax, None, None, None, 256


def _bnb_reference_dequant(q, st):
    """bitsandbytes' device-independent dequantisation (its `default` backend, which its CUDA
    kernel matches): flat blocks of `blocksize` over the row-major weight."""
    try:  # private: None if another bitsandbytes version moved it
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code
    except ImportError:
        return None
    import bitsandbytes.functional as BF

    absmax = st.absmax
    with torch.compiler.set_stance("force_eager"):
        if st.nested:
            absmax = BF.dequantize_blockwise(st.absmax, st.state2) + st.offset
        return _dequantize_4bit_compute(
            q.reshape(-1), absmax, _get_4bit_code(st.quant_type, q.device), st.blocksize, st.shape, st.dtype
        )


def _cpu_kernel_is_consistent(in_f, blocksize):
    # bitsandbytes 0.50.2's vectorised CPU dequantisation restarts blocks at every row: wrong
    # (vs its own quantizer and CUDA kernel) when rows of a multiple of 16 do not hold whole blocks
    return in_f % 16 != 0 or in_f % blocksize == 0 or blocksize >= 2048


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_dequant_is_bit_exact_vs_bitsandbytes(quant_type, nested, device):
    pytest.importorskip("bitsandbytes")
    for dtype in DTYPES:
        for blocksize, (out_f, in_f) in (
            (64, (48, 72)),
            (64, (40, 128)),
            (128, (37, 51)),
            (32, (5, 7)),
            (4096, (33, 200)),
            (256, (96, 64)),
        ):
            q, st, bnb = _quantized(out_f, in_f, dtype, quant_type, nested, blocksize, device)
            ref = _bnb_reference_dequant(q, st)
            absmax, n_absmax, n_code, offset, n_bs = _state_args(st)
            args = (q, absmax, st.blocksize, st.quant_type, st.shape, dtype, n_absmax, n_code, offset, n_bs)
            assert use_triton(q)
            got = bnb4.dequantize_4bit(*args)
            what = (dtype, blocksize, out_f, in_f)
            assert got.dtype == dtype and got.shape == bnb.shape
            if ref is not None:
                assert torch.equal(got, ref), (what, (got != ref).sum().item())
            # bitsandbytes.functional itself: its CUDA kernel, or on CPU where that is consistent
            if device != "cpu" or _cpu_kernel_is_consistent(in_f, blocksize):
                assert torch.equal(got, bnb), what
            # the torch path (devices without Triton) gives the same bits
            assert torch.equal(bnb4.dequantize_4bit_torch(*args), got), what


def test_dequant_round_trip_is_within_half_a_code_step(device):
    """Independent of bitsandbytes' dequantiser: every value comes back to within half the
    widest gap of the NF4 table times its block's absmax."""
    import bitsandbytes.functional as BF

    w = torch.randn(96, 64, device=device)
    q, st = BF.quantize_4bit(w, blocksize=128, compress_statistics=False, quant_type="nf4")
    got = bnb4.dequantize_4bit(q, st.absmax, 128, "nf4", st.shape, torch.float32)
    codes = bnb4.code_table("nf4", "cpu")
    half_gap = (codes[1:] - codes[:-1]).max().item() / 2
    bound = st.absmax.repeat_interleave(128).view(96, 64) * half_gap
    assert ((got - w).abs() <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("triton_path", [True, False])
def test_dequant_into_rows_of_a_stacked_buffer(triton_path, device, monkeypatch):
    """out=/out_row=: two weights written into the rows of one buffer, each equal to its own
    dequantisation, the rows around them untouched (the 4-bit siblings' stacked weight)."""
    pytest.importorskip("bitsandbytes")
    if not triton_path:
        monkeypatch.setattr(bnb4, "use_triton", lambda t: False)
    (o1, o2), in_f = (int(v) for v in torch.randint(3, 40, (2,))), 2 * int(torch.randint(5, 50, ()))
    parts = [_quantized(o, in_f, torch.bfloat16, "nf4", True, 64, device) for o in (o1, o2)]
    sentinel = -7.0
    buf = torch.full((o1 + o2 + 3, in_f), sentinel, dtype=torch.bfloat16, device=device)
    row = 1
    for q, st, _ in parts:
        absmax, *nested = _state_args(st)
        args = (q, absmax, st.blocksize, st.quant_type, st.shape, torch.bfloat16, *nested)
        assert bnb4.dequantize_4bit(*args, out=buf, out_row=row) is buf
        assert torch.equal(buf[row : row + st.shape[0]], bnb4.dequantize_4bit(*args))
        row += st.shape[0]
    assert (buf[0] == sentinel).all() and (buf[row:] == sentinel).all()
    with pytest.raises(ValueError, match="out must be"):
        bnb4.dequantize_4bit(*args, out=buf, out_row=buf.shape[0] - st.shape[0] + 1)


def test_dequant_rejects_inconsistent_state():
    q = torch.zeros(10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="blocksize"):
        bnb4.dequantize_4bit(q, torch.ones(1), 48, "nf4", (4, 5), torch.float32)
    with pytest.raises(ValueError, match="packed bytes"):
        bnb4.dequantize_4bit(q, torch.ones(1), 64, "nf4", (5, 5), torch.float32)
    with pytest.raises(ValueError, match="quant_type"):
        bnb4.dequantize_4bit(q, torch.ones(1), 64, "int4", (4, 5), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_4bit_forward_backward_vs_float64(dtype, quant_type, nested, device):
    """Reference: the same LoRA math over bitsandbytes' own dequantised weight."""
    pytest.importorskip("bitsandbytes")
    out_f, in_f, r = 46, 70, 6
    q, st, wref = _quantized(out_f, in_f, dtype, quant_type, nested)
    absmax, n_absmax, n_code, offset, n_bs = _state_args(st)
    _, _, a, b = _layer(out_f, in_f, r, dtype, device)
    x = torch.randn(2, 19, in_f, dtype=dtype, device=device, requires_grad=True)
    a.requires_grad_(), b.requires_grad_()
    y, _, _ = torch.ops.foak.lora_linear_4bit(
        x,
        q,
        absmax,
        n_absmax,
        n_code,
        offset,
        None,
        a,
        b,
        0.5,
        0.0,
        quant_type,
        st.blocksize,
        n_bs,
        list(st.shape),
        dtype,
        dtype,
    )
    dy = torch.randn_like(y)
    y.backward(dy)
    _check_against_reference(y, dy, x, wref, None, a, b, 0.5, tol=TOL[dtype])


def test_4bit_compute_dtype_and_output_dtype_differ_from_input(device):
    """fp32 activations into a bf16-compute 4-bit layer (bitsandbytes casts x), fp32 result."""
    pytest.importorskip("bitsandbytes")
    q, st, wref = _quantized(24, 40, torch.bfloat16, "nf4", True)
    absmax, n_absmax, n_code, offset, n_bs = _state_args(st)
    _, _, a, b = _layer(24, 40, 4, torch.float32, device)
    x = torch.randn(9, 40, device=device, requires_grad=True)
    y, t, _ = torch.ops.foak.lora_linear_4bit(
        x,
        q,
        absmax,
        n_absmax,
        n_code,
        offset,
        None,
        a,
        b,
        2.0,
        0.0,
        "nf4",
        st.blocksize,
        n_bs,
        [24, 40],
        torch.bfloat16,
        torch.float32,
    )
    assert y.dtype == torch.float32 and t.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    want = _reference(x.detach().bfloat16().double(), wref, None, a.bfloat16().double(), b.bfloat16().double(), 2.0)
    assert rel_err(y, want) < 2e-2


def test_mixed_precision_adapter(device):
    """peft keeps fp32 adapters on a bf16 base: GEMMs run in bf16, grads come back in fp32."""
    w, _, a, b = _layer(31, 50, 8, torch.bfloat16, device, adapter_dtype=torch.float32)
    x = torch.randn(3, 11, 50, dtype=torch.bfloat16, device=device, requires_grad=True)
    a.requires_grad_(), b.requires_grad_()
    y, _, _ = torch.ops.foak.lora_linear(x, w, None, a, b, 2.0, 0.0, torch.bfloat16)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert a.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    _check_against_reference(y, dy, x, w, None, a, b, 2.0, tol=3e-2)


# --- dropout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_distribution(p, path, device, monkeypatch):
    """iid keep with probability 1 − p, kept values scaled by 1/(1 − p), a new mask per seed;
    for the Triton kernel and for the torch path's hash alike."""
    if path == "torch":
        monkeypatch.setattr(kernel, "use_triton", lambda t: False)
    rows, cols = 200, 1000
    n = rows * cols
    ones = torch.ones(rows, cols, device=device)
    y = kernel.dropout(ones, 1234, p, torch.float32)
    keep = y != 0
    assert torch.equal(y[keep], torch.full_like(y[keep], 1.0 / (1.0 - p)))
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # no structure along rows or columns: per-row / per-column keep rates scatter like binomials
    for dim, size in ((1, cols), (0, rows)):
        rates = keep.float().mean(dim)
        assert (rates - (1 - p)).abs().max().item() < 6 * (p * (1 - p) / size) ** 0.5
    # neighbours independent
    both = (keep[:, 1:] & keep[:, :-1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 6 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5
    # same seed, same mask; another seed, an independent mask
    assert torch.equal(kernel.dropout(ones, 1234, p, torch.float32), y)
    other = kernel.dropout(ones, 99, p, torch.float32) != 0
    agree = (other == keep).float().mean().item()
    assert abs(agree - ((1 - p) ** 2 + p**2)) < 6 * (0.25 / n) ** 0.5


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_forward_and_backward_use_one_mask(path, dtype, device, monkeypatch):
    """The op's output and all three gradients equal float64 math with the mask of its seed."""
    if path == "torch":
        monkeypatch.setattr(kernel, "use_triton", lambda t: False)
    p, s = 0.3, 1.5
    w, _, a, b = _layer(33, 65, 8, dtype, device)
    x = torch.randn(4, 21, 65, dtype=dtype, device=device, requires_grad=True)
    a.requires_grad_(), b.requires_grad_()
    y, _, seed = torch.ops.foak.lora_linear(x, w, None, a, b, s, p, dtype)
    assert seed.device == x.device and seed.dtype == torch.int64 and seed.shape == (1,)
    keep = kernel.dropout(torch.ones(4 * 21, 65, device=device), seed, p, torch.float32).view(x.shape) != 0
    assert 0.55 < keep.float().mean().item() < 0.85  # the mask is not trivially all kept/dropped
    dy = torch.randn_like(y)
    y.backward(dy)
    _check_against_reference(y, dy, x, w, None, a, b, s, keep, p, tol=TOL[dtype])
    # a second call draws a new mask
    _, _, seed2 = torch.ops.foak.lora_linear(x, w, None, a, b, s, p, dtype)
    assert int(seed2) != int(seed)


def test_dropout_4bit_backward_uses_the_forward_mask(device):
    pytest.importorskip("bitsandbytes")
    p = 0.25
    q, st, wref = _quantized(30, 64, torch.float32, "nf4", True)
    absmax, n_absmax, n_code, offset, n_bs = _state_args(st)
    _, _, a, b = _layer(30, 64, 4, torch.float32, device)
    x = torch.randn(40, 64, device=device, requires_grad=True)
    a.requires_grad_(), b.requires_grad_()
    y, _, seed = torch.ops.foak.lora_linear_4bit(
        x,
        q,
        absmax,
        n_absmax,
        n_code,
        offset,
        None,
        a,
        b,
        2.0,
        p,
        "nf4",
        64,
        n_bs,
        [30, 64],
        torch.float32,
        torch.float32,
    )
    keep = kernel.dropout(torch.ones_like(x), seed, p, torch.float32) != 0
    dy = torch.randn_like(y)
    y.backward(dy)
    _check_against_reference(y, dy, x, wref, None, a, b, 2.0, keep, p)


def test_seed_follows_torch_manual_seed(device):
    """Seeds come from torch's generator on x's device: reproducible, and replayed by activation
    checkpointing."""
    w, _, a, b = _layer(16, 32, 4, torch.float32, device)
    x = torch.randn(8, 32, device=device)
    torch.manual_seed(7)
    y1 = torch.ops.foak.lora_linear(x, w, None, a, b, 1.0, 0.5, torch.float32)[0]
    torch.manual_seed(7)
    y2 = torch.ops.foak.lora_linear(x, w, None, a, b, 1.0, 0.5, torch.float32)[0]
    assert torch.equal(y1, y2)


# --- what the backward computes ---------------------------------------------------------------------


def test_grads_only_where_needed(device):
    w, _, a, b = _layer(20, 24, 4, torch.float32, device)
    x = torch.randn(6, 24, device=device)
    b.requires_grad_()  # x and A frozen
    y, _, _ = torch.ops.foak.lora_linear(x, w, None, a, b, 1.0, 0.0, torch.float32)
    y.sum().backward()
    assert b.grad is not None and a.grad is None and x.grad is None
    t = torch.ops.foak.lora_linear(x, w, None, a, b, 1.0, 0.0, torch.float32)[1]
    dx, dbias, da, db = torch.ops.foak.lora_linear_backward(
        torch.ones(6, 20, device=device),
        x,
        w,
        None,
        a,
        b,
        t,
        torch.zeros((), dtype=torch.int64),
        1.0,
        0.0,
        False,
        False,
        False,
        True,
    )
    assert dx.numel() == dbias.numel() == da.numel() == 0 and db.shape == b.shape


def test_trained_base_weight_is_refused(device):
    w, _, a, b = _layer(20, 24, 4, torch.float32, device)
    w.requires_grad_()
    y, _, _ = torch.ops.foak.lora_linear(torch.randn(5, 24, device=device), w, None, a, b, 1.0, 0.0, torch.float32)
    with pytest.raises(NotImplementedError, match="base weight is frozen"):
        y.sum().backward()


def test_shapes_that_do_not_chain_are_refused(device):
    w, _, a, b = _layer(20, 24, 4, torch.float32, device)
    with pytest.raises(ValueError, match="do not chain"):
        torch.ops.foak.lora_linear(torch.randn(5, 23, device=device), w, None, a, b, 1.0, 0.0, torch.float32)
    with pytest.raises(ValueError, match="dropout_p"):
        torch.ops.foak.lora_linear(torch.randn(5, 24, device=device), w, None, a, b, 1.0, 1.0, torch.float32)


def test_fake_impls_match_real():
    w, bias, a, b = _layer(12, 16, 4, torch.float32, "cpu", bias=True)
    args = (
        torch.randn(2, 5, 16, requires_grad=True),
        w,
        bias.requires_grad_(),
        a.requires_grad_(),
        b.requires_grad_(),
        0.5,
        0.0,
        torch.float32,
    )
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.foak.lora_linear.default, args, test_utils=checks)
    pytest.importorskip("bitsandbytes")
    q, st, _ = _quantized(12, 16, torch.float32, "nf4", True)
    absmax, n_absmax, n_code, offset, n_bs = _state_args(st)
    args4 = (
        torch.randn(2, 5, 16, requires_grad=True),
        q,
        absmax,
        n_absmax,
        n_code,
        offset,
        None,
        a,
        b,
        0.5,
        0.0,
        "nf4",
        64,
        n_bs,
        [12, 16],
        torch.float32,
        torch.bfloat16,
    )
    torch.library.opcheck(torch.ops.foak.lora_linear_4bit.default, args4, test_utils=checks)


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_opaque_dequant_ops(quant_type, nested, device, monkeypatch, foak_config):
    """torch.ops.foak.dequantize_4bit(_stacked), what the 4-bit LoRA ops call with
    FOAK_OPAQUE_DEQUANT=1: the kernel's bits, fake impls that match, and the same LoRA results."""
    pytest.importorskip("bitsandbytes")
    from foak_compile.ops import dequant

    parts = [_quantized(o, 70, torch.bfloat16, quant_type, nested, device=device) for o in (13, 22)]
    states = [(q, *_state_args(st)) for q, st, _ in parts]
    single = [
        (q, absmax, na, nc, off, quant_type, st.blocksize, nbs, list(st.shape), torch.bfloat16, dequant.FORWARD)
        for (q, absmax, na, nc, off, nbs), (_, st, _) in zip(states, parts)
    ]
    for args, (_, _, wref) in zip(single, parts):
        assert torch.equal(torch.ops.foak.dequantize_4bit(*args), wref)
        torch.library.opcheck(
            torch.ops.foak.dequantize_4bit.default, args, test_utils=("test_schema", "test_faketensor")
        )
    lists = [list(col) for col in zip(*[a[:5] for a in single])]
    stacked_args = (*lists, quant_type, single[0][6], single[0][7], [13, 70, 22, 70], torch.bfloat16, dequant.BACKWARD)
    assert torch.equal(torch.ops.foak.dequantize_4bit_stacked(*stacked_args), torch.cat([w for _, _, w in parts]))
    torch.library.opcheck(
        torch.ops.foak.dequantize_4bit_stacked.default, stacked_args, test_utils=("test_schema", "test_faketensor")
    )
    shapes = [(13, 70), (22, 70)]
    routes = []
    for opaque in (False, True):
        foak_config(opaque_dequant=opaque)
        routes.append(
            dequant.stacked_weight(
                *lists, quant_type, single[0][6], single[0][7], shapes, torch.bfloat16, dequant.FORWARD
            )
        )
    assert torch.equal(*routes)
    # the LoRA op through either route: the same bits, forward and backward
    q, absmax, na, nc, off, nbs = states[0]
    st = parts[0][1]
    _, _, a, b = _layer(13, 70, 4, torch.bfloat16, device)
    x = torch.randn(5, 70, dtype=torch.bfloat16, device=device)
    outs = []
    opaque_calls = []
    real = torch.ops.foak.dequantize_4bit  # looked up on torch.ops.foak per call
    monkeypatch.setattr(torch.ops.foak, "dequantize_4bit", lambda *args: opaque_calls.append(args[-1]) or real(*args))
    for opaque in (False, True):
        foak_config(opaque_dequant=opaque)
        del opaque_calls[:]
        xi, ai, bi = (t.clone().requires_grad_() for t in (x, a, b))
        y = torch.ops.foak.lora_linear_4bit(
            xi,
            q,
            absmax,
            na,
            nc,
            off,
            None,
            ai,
            bi,
            0.5,
            0.0,
            quant_type,
            st.blocksize,
            nbs,
            list(st.shape),
            torch.bfloat16,
            torch.bfloat16,
        )[0]
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad, ai.grad, bi.grad))
        assert opaque_calls == ([dequant.FORWARD, dequant.BACKWARD] if opaque else []), opaque_calls
    for got, want in zip(*outs):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,r,col0,extra", [(37, 53, 16, 0, 0), (70, 130, 5, 11, 9), (3, 200, 80, 7, 0)])
def test_low_rank_add_vs_float64(dtype, m, n, r, col0, extra, device):
    """y[:, col0:col0+n] += alpha·u·vᵀ in place, one rounding: within half an ulp of float64 (plus the
    fp32 accumulation's error), the columns outside untouched; u a column slice, v a transposed view
    (as the backward passes A), r beyond one 64-wide step."""
    y = torch.randn(m, col0 + n + extra, dtype=dtype, device=device)
    u = torch.randn(m, r + 3, dtype=dtype, device=device)[:, 2 : 2 + r]
    v = torch.randn(r, n, dtype=dtype, device=device).t()
    alpha = float(torch.empty(()).uniform_(0.3, 3.0))
    want = y.double()
    want[:, col0 : col0 + n] += alpha * (u.double() @ v.double().t())
    before = y.clone()
    out = kernel.low_rank_add_(y, u, v, alpha, col0=col0)
    assert out is y
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    err = (y.double() - want).abs()
    assert (err <= 0.5 * ulp * want.abs() + 1e-5 * (r**0.5) * alpha).all(), err.max()
    assert torch.equal(y[:, :col0], before[:, :col0]) and torch.equal(y[:, col0 + n :], before[:, col0 + n :])
