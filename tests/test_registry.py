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
