"""What every kernel launcher needs: when Triton can run, and torch → Triton dtypes."""

import functools
import os

import torch
import triton
import triton.language as tl

# TRITON_INTERPRET is read by triton.jit at decoration time, so it must be set before this
# package is imported; we read it once, the same way.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run the kernels; CPU tensors only under the Triton interpreter."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(t: torch.Tensor, work_items: int, per_sm: int = 2) -> int:
    """Grid size for kernels that loop over work items and keep a per-program accumulator."""
    if t.is_cuda:
        return max(1, min(work_items, _sm_count(t.device.index or 0) * per_sm))
    return max(1, min(work_items, 4))  # interpreter: few programs keep it fast


# The interpreter converts fp32→bf16 by truncation, GPUs round to nearest even; kernels round
# through `cast` so CI sees the numbers a GPU produces.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def cast(x, DTYPE: tl.constexpr):
    """fp32 `x` to DTYPE, rounding to nearest even."""
    if _ROUND_BF16_BY_HAND:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last dim], unit stride along the row (a row stride is fine: kernels take it)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


def grid_2d(n_rows: int, n_cols: int):
    """(grid, BLOCK_R, BLOCK_C) for elementwise kernels over [rows, cols] tiles of ~4096 elements."""
    block_c = min(1024, triton.next_power_of_2(max(n_cols, 16)))
    block_r = max(1, 4096 // block_c)
    return (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c)), block_r, block_c


def wrap_triton(kernel):
    """Launch through torch.library.wrap_triton: inside an inlined op (ops/registry.py) the launch
    becomes a graph node inductor can schedule. Called eagerly it is the plain kernel only where torch's
    wrap_triton dispatch is switched off (triton_op's eager calls, ops/registry.direct_launches); otherwise
    it goes through torch's higher-order-op dispatch, ~1 ms by torch's comment."""
    wrap = getattr(torch.library, "wrap_triton", None)
    return kernel if wrap is None else wrap(kernel)
