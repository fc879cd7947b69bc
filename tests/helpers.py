"""Small comparisons shared by the test modules."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """Largest absolute difference of `a` from `b`, relative to `b`'s largest element, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()
