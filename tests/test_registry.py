"""ops/registry.py's cache of torch's Triton access analysis (compile time of inlined ops): one
analysis per kernel and argument signature, never shared across dtypes or scalar values."""

import torch
import triton.language as tl

from foak_compile.ops import registry


class _Kernel:
    """Stands in for a JITFunction: what the cache reads is the wrapped function's module."""

    def __init__(self, module="foak_compile.kernels.stand_in"):
        def fn():
            pass

        fn.__module__ = module
        self.fn = fn


def _counting():
    calls = []

    def analysis(kernel, kwargs, tma):
        calls.append(dict(kwargs))
        return [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]

    return registry._cached(analysis), calls


def test_same_signature_is_analysed_once():
    cached, calls = _counting()
    kernel = _Kernel()
    n = int(torch.randint(3, 100, ()))
    first = cached(kernel, {"X": torch.empty(n), "n": n, "BLOCK": tl.constexpr(64)}, {})
    again = cached(kernel, {"X": torch.empty(n + 1), "n": n, "BLOCK": tl.constexpr(64)}, {})
    assert first == again == ["X"] and len(calls) == 1
    first.append("mutated by a caller")
    assert cached(kernel, {"X": torch.empty(2), "n": n, "BLOCK": tl.constexpr(64)}, {}) == ["X"]


def test_dtype_scalar_constexpr_kernel_and_tma_each_miss():
    cached, calls = _counting()
    kernel = _Kernel()
    base = {"X": torch.empty(5), "n": 5, "BLOCK": tl.constexpr(64)}
    cached(kernel, base, {})
    cached(kernel, {**base, "X": torch.empty(5, dtype=torch.bfloat16)}, {})
    cached(kernel, {**base, "n": 6}, {})
    cached(kernel, {**base, "BLOCK": tl.constexpr(128)}, {})
    cached(_Kernel(), base, {})
    cached(kernel, base, {"X": ("tma", 1)})
    assert len(calls) == 6


def test_unknown_argument_kinds_are_not_cached():
    cached, calls = _counting()
    kernel = _Kernel()
    for _ in range(2):
        cached(kernel, {"X": torch.empty(3), "odd": object()}, {})
    assert len(calls) == 2


def test_other_libraries_kernels_are_not_cached():
    cached, calls = _counting()
    kernel = _Kernel(module="someone_else.kernels")
    for _ in range(2):
        cached(kernel, {"X": torch.empty(3), "n": 3}, {})
    assert len(calls) == 2


def _spy_wrap_triton(monkeypatch, module):
    """Record, per launch in `module`, whether torch would route a wrap_triton launch through its
    higher-order-op dispatch (the slow eager path)."""
    from torch._library.triton import is_wrap_triton_enabled

    seen = []
    real = module.wrap_triton

    def spy(kernel):
        seen.append(is_wrap_triton_enabled())
        return real(kernel)

    monkeypatch.setattr(module, "wrap_triton", spy)
    return seen


def test_opaque_ops_launch_their_kernels_directly(monkeypatch):
    """An opaque op's body (every fused op here, on the CPU; the opaque dequant everywhere) runs its
    wrap_triton launches as plain launches: torch's higher-order-op path costs ~1 ms a launch."""
    import foak_compile  # noqa: F401  (registers the ops)
    from foak_compile.kernels import rms_norm as rms_kernel

    if registry.is_inlined("foak::rms_norm"):
        import pytest

        pytest.skip("rms_norm is inlined here (a triton_op launches directly when called eagerly)")
    seen = _spy_wrap_triton(monkeypatch, rms_kernel)
    n, d = (int(v) for v in torch.randint(3, 70, (2,)))
    torch.ops.foak.rms_norm(torch.randn(n, d), torch.randn(d), 1e-6, None, torch.float32)
    assert seen == [False]


def test_opaque_dequant_launches_directly(monkeypatch):
    import pytest

    bf = pytest.importorskip("bitsandbytes.functional")
    from foak_compile.kernels import bnb4
    from foak_compile.ops import dequant

    seen = _spy_wrap_triton(monkeypatch, bnb4)
    o, i = int(torch.randint(3, 40, ())), 64 * int(torch.randint(1, 4, ()))
    q, st = bf.quantize_4bit(torch.randn(o, i), quant_type="nf4", compress_statistics=False)
    args = (q, st.absmax, None, None, None, "nf4", st.blocksize, 256)
    torch.ops.foak.dequantize_4bit(*args, [o, i], torch.float32, dequant.FORWARD)
    torch.ops.foak.dequantize_4bit_stacked(*[[v] for v in args[:5]], *args[5:], [o, i], torch.float32, dequant.BACKWARD)
    assert seen == [False, False]
    from torch._library.triton import is_wrap_triton_enabled

    assert is_wrap_triton_enabled()  # switched back after the call
