"""The logit epilogue shared by the chunked (cross_entropy.py) and the online (cross_entropy_online.py)
lm_head + cross-entropy paths: what a model does to its logits between lm_head and loss, as an
`Epilogue` value and as the `_epilogue` Triton helper their kernels call on each logit.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import cast


class Epilogue(NamedTuple):
    """z → z·scale → z/divisor → softcap·tanh(z/softcap) on each logit z before the loss (identity
    steps: scale 1, divisor 1, softcap 0); `rounded`: each step's result rounded to the logits'
    dtype, as eager computes it on half-precision logits (False: in fp32, after an upcast)."""

    scale: float = 1.0
    divisor: float = 1.0
    softcap: float = 0.0
    rounded: bool = False

    def flags(self, t: torch.Tensor) -> int:
        """The kernels' EPI constexpr for logits t: which steps run (0: none), and how to divide."""
        steps = (
            (_MUL if self.scale != 1.0 else 0) | (_DIV if self.divisor != 1.0 else 0) | (_CAP if self.softcap else 0)
        )
        if not steps:
            return 0
        return steps | (_ROUND if self.rounded else 0) | (_RECIP if _divides_by_reciprocal(t) else 0)

    def kernel_args(self, t: torch.Tensor) -> tuple:
        """(scale, divisor, softcap, softcap's divisor): the divisors as their fp32 reciprocals where
        torch divides by multiplying with one."""
        if not _divides_by_reciprocal(t):
            return self.scale, self.divisor, self.softcap, self.softcap
        return self.scale, _fp32_reciprocal(self.divisor), self.softcap, _fp32_reciprocal(self.softcap or 1.0)


NO_EPILOGUE = Epilogue()
_MUL, _DIV, _CAP, _ROUND, _RECIP = 1, 2, 4, 8, 16  # bits of EPI (the kernels spell them as these literals)


def _divides_by_reciprocal(t: torch.Tensor) -> bool:
    """torch's CUDA kernel divides a tensor by a Python number as a·(1/b), 1/b in fp32 (one bit of
    precision less than a division, its comment says); on the CPU it divides."""
    return t.is_cuda


def _fp32_reciprocal(v: float) -> float:
    return (torch.ones((), dtype=torch.float32) / torch.tensor(v, dtype=torch.float32)).item()


@triton.jit
def _tanh(u):
    """fp32 tanh to a few ulp: its series where 1 - e^(-2|u|) would cancel, exp beyond."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    u2 = u * u
    series = a * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, series, (1.0 - e) / (1.0 + e))
    return tl.where(u < 0, -t, t)


@triton.jit
def _round_if(x, ROUND: tl.constexpr, DTYPE: tl.constexpr):
    if ROUND:
        x = cast(x, DTYPE).to(tl.float32)
    return x


@triton.jit
def _divide(x, div, RECIP: tl.constexpr):
    """x / b as torch computes it: `div` is b (an IEEE division, CPU) or fp32 1/b (RECIP: CUDA)."""
    if RECIP:
        return x * div
    return tl.math.div_rn(x, div)


@triton.jit
def _epilogue(x, mul, div, cap, cdiv, EPI: tl.constexpr, DTYPE: tl.constexpr):
    """(v, dv/dx) of the Epilogue on fp32 logits x (Epilogue.kernel_args gives mul, div, cap, cdiv).
    EPI bits: 1 ·mul, 2 /div, 4 softcap, 8 round each step to DTYPE, 16 divide by reciprocals."""
    ROUND: tl.constexpr = (EPI & 8) != 0
    RECIP: tl.constexpr = (EPI & 16) != 0
    d = 1.0
    if EPI & 1:
        x = _round_if(x * mul, ROUND, DTYPE)
        d = d * mul
    if EPI & 2:
        x = _round_if(_divide(x, div, RECIP), ROUND, DTYPE)
        if RECIP:
            d = d * div
        else:
            d = d / div
    if EPI & 4:
        t = _round_if(_tanh(_round_if(_divide(x, cdiv, RECIP), ROUND, DTYPE)), ROUND, DTYPE)
        x = _round_if(t * cap, ROUND, DTYPE)
        d = d * (1.0 - t * t)  # what eager's tanh backward computes from its saved output
    return x, d
