"""torch.ops.foak.cross_entropy and torch.ops.foak.linear_cross_entropy, over kernels/cross_entropy.py.

Both take class-index labels of any shape (flattened like the logits' leading dims) and
follow F.cross_entropy(..., ignore_index, reduction, label_smoothing) without class weights:
'mean' divides by the number of non-ignored labels (NaN when there are none, like torch),
'sum' adds, 'none' returns per-label losses (0 where ignored) shaped like `labels`.
The loss is computed in fp32 and returned in `out_dtype`. Each op also returns the fp32
per-label logsumexp (not differentiable).

linear_cross_entropy is a composite over two custom ops (see below): with a mean/sum loss and a
gradient wanted, the forward takes the gradients itself and the backward only scales them. Its
last four arguments are what the model does to the logits before the loss (kernels'
`Epilogue`): z·logit_scale, then z/logit_divisor, then softcap·tanh(z/softcap) (0: none), each
rounded to the logits' dtype when round_epilogue.
"""

import math
from typing import Optional

import torch

from ..kernels import cross_entropy as kernel
from ..kernels.ce_epilogue import Epilogue

REDUCTIONS = ("mean", "sum", "none")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] as [rows, C]; unlike reshape(-1, C) also for C == 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _check(n_rows: int, labels: torch.Tensor, label_smoothing: float, reduction: str) -> None:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        # torch raises a RuntimeError too; the kernel cannot index with these
        raise RuntimeError(f"foak cross_entropy: labels must be integer class indices, not {labels.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
    if labels.numel() != n_rows:
        raise ValueError(f"{n_rows} rows of logits but {labels.numel()} labels")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], not {label_smoothing}")


def _check_lm_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], epi: Epilogue) -> Epilogue:
    # F.linear promotes a bias of another dtype; the chunked GEMMs need one dtype (the pattern
    # only matches that)
    if bias is not None and bias.dtype != weight.dtype:
        raise RuntimeError(f"foak linear_cross_entropy: bias is {bias.dtype} but the weight is {weight.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"foak linear_cross_entropy: bias {tuple(bias.shape)} is not [vocab] = [{weight.shape[0]}]")
    if epi.scale == 0.0 or epi.divisor == 0.0 or epi.softcap < 0.0 or not all(map(math.isfinite, epi[:3])):
        raise ValueError(
            f"foak linear_cross_entropy: logit scale {epi.scale}, divisor {epi.divisor}, softcap "
            f"{epi.softcap}: scale and divisor must be finite and nonzero, softcap finite and ≥ 0"
        )
    return epi


def _reduce(loss, labels, ignore_index, reduction, out_dtype):
    if reduction == "none":
        return loss.view(labels.shape).to(out_dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total / (labels != ignore_index).sum()  # 0/0 = NaN when every label is ignored
    return total.to(out_dtype)


def _row_scale(dloss, labels, ignore_index, reduction):
    """d(total)/d(loss_r) · dloss: fp32, one value per row ('none') or one for all rows."""
    d = dloss.float()
    if reduction == "none":
        return d.reshape(-1).contiguous()  # upstream grads may be expanded (stride 0)
    if reduction == "mean":
        d = d / (labels != ignore_index).sum()
    return d.reshape(1)


def _fake_outputs(like, labels, reduction, out_dtype):
    loss = like.new_empty(labels.shape if reduction == "none" else (), dtype=out_dtype)
    return loss, like.new_empty(labels.shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("foak::cross_entropy", mutates_args=())
def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) of F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1), ...)."""
    x = _rows(logits)
    _check(x.shape[0], labels, label_smoothing, reduction)
    loss, lse = kernel.cross_entropy_forward(x, labels.reshape(-1), ignore_index, label_smoothing)
    return _reduce(loss, labels, ignore_index, reduction, out_dtype), lse.view(labels.shape)


@cross_entropy.register_fake
def _(logits, labels, ignore_index, label_smoothing, reduction, out_dtype):
    return _fake_outputs(logits, labels, reduction, out_dtype)


@torch.library.custom_op("foak::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    dloss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> torch.Tensor:
    """dloss/dlogits, in the logits' dtype and shape."""
    x = _rows(logits)
    scale = _row_scale(dloss, labels, ignore_index, reduction)
    dx = kernel.cross_entropy_backward(x, labels.reshape(-1), lse.reshape(-1), scale, ignore_index, label_smoothing)
    return dx.view(logits.shape)


@cross_entropy_backward.register_fake
def _(dloss, logits, labels, lse, ignore_index, label_smoothing, reduction):
    return logits.new_empty(logits.shape)


def _ce_setup_context(ctx, inputs, output):
    logits, labels, ignore_index, label_smoothing, reduction, _ = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.args = (ignore_index, label_smoothing, reduction)


def _ce_backward(ctx, dloss, _dlse):
    logits, labels, lse = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0] and dloss is not None:
        dx = torch.ops.foak.cross_entropy_backward(dloss, logits, labels, lse, *ctx.args)
    return dx, None, None, None, None, None


cross_entropy.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# ---------------------------------------------------------------------------------------------

# lm_head + cross-entropy. torch.ops.foak.linear_cross_entropy is a composite that picks, where
# autograd can see what is wanted (eager, or AOTAutograd tracing the graph), one of two ops:
#   linear_cross_entropy_fused      mean/sum with a gradient wanted: the forward takes the
#                                   gradients too and keeps them; the backward scales them
#   linear_cross_entropy_recompute  no gradient, or reduction 'none' (one upstream value per
#                                   row, unknown in the forward): keeps lse, the backward
#                                   recomputes the logits

LCE_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, SymInt ignore_index, "
    "float label_smoothing, str reduction, ScalarType out_dtype, float logit_scale=1., "
    "float logit_divisor=1., float softcap=0., bool round_epilogue=False) -> (Tensor, Tensor)"
)
torch.library.define("foak::linear_cross_entropy", LCE_SCHEMA)


@torch.library.impl("foak::linear_cross_entropy", "CompositeImplicitAutograd")
def linear_cross_entropy(
    hidden,
    weight,
    bias,
    labels,
    ignore_index,
    label_smoothing,
    reduction,
    out_dtype,
    logit_scale=1.0,
    logit_divisor=1.0,
    softcap=0.0,
    round_epilogue=False,
):
    """(loss, lse) of F.cross_entropy(epilogue(F.linear(hidden, weight, bias)).float() rows, labels, ...),
    never holding more than one chunk of tokens' logits."""
    need = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    epi = (logit_scale, logit_divisor, softcap, round_epilogue)
    if reduction != "none" and any(need):
        out = torch.ops.foak.linear_cross_entropy_fused(
            hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, out_dtype, *need, *epi
        )
        return out[0], out[1]
    return torch.ops.foak.linear_cross_entropy_recompute(
        hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, out_dtype, *epi
    )


@torch.library.custom_op("foak::linear_cross_entropy_recompute", mutates_args=())
def linear_cross_entropy_recompute(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    out_dtype: torch.dtype,
    logit_scale: float = 1.0,
    logit_divisor: float = 1.0,
    softcap: float = 0.0,
    round_epilogue: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse); the backward (linear_cross_entropy_backward) recomputes the logits."""
    h = _rows(hidden)
    _check(h.shape[0], labels, label_smoothing, reduction)
    epi = _check_lm_head(hidden, weight, bias, Epilogue(logit_scale, logit_divisor, softcap, round_epilogue))
    loss, lse = kernel.linear_cross_entropy_forward(
        h, weight, bias, labels.reshape(-1), ignore_index, label_smoothing, epi=epi
    )
    return _reduce(loss, labels, ignore_index, reduction, out_dtype), lse.view(labels.shape)


@linear_cross_entropy_recompute.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, out_dtype, *epilogue):
    return _fake_outputs(hidden, labels, reduction, out_dtype)


@torch.library.custom_op("foak::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    dloss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    logit_scale: float = 1.0,
    logit_divisor: float = 1.0,
    softcap: float = 0.0,
    round_epilogue: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias); a gradient that is not needed comes back as an empty tensor."""
    h = _rows(hidden)
    scale = _row_scale(dloss, labels, ignore_index, reduction)
    epi = Epilogue(logit_scale, logit_divisor, softcap, round_epilogue)
    dh, dw, db = kernel.linear_cross_entropy_backward(
        scale,
        h,
        weight,
        bias,
        labels.reshape(-1),
        lse.reshape(-1),
        ignore_index,
        label_smoothing,
        need_hidden,
        need_weight,
        need_bias,
        epi=epi,
    )
    return _grads_or_empty(hidden, weight, dh, dw, db)


def _grads_or_empty(hidden, weight, dh, dw, db):
    return (
        dh.view(hidden.shape) if dh is not None else hidden.new_empty(0),
        dw if dw is not None else weight.new_empty(0),
        db if db is not None else weight.new_empty(0),
    )


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    need_bias = need_bias and bias is not None
    return (
        hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_weight else weight.new_empty(0),
        bias.new_empty(bias.shape) if need_bias else weight.new_empty(0),
    )


@linear_cross_entropy_backward.register_fake
def _(
    dloss,
    hidden,
    weight,
    bias,
    labels,
    lse,
    ignore_index,
    label_smoothing,
    reduction,
    need_hidden,
    need_weight,
    need_bias,
    *epilogue,
):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _recompute_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, _, *epilogue = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.args = (ignore_index, label_smoothing, reduction)
    ctx.epilogue = epilogue


def _recompute_backward(ctx, dloss, _dlse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.needs_input_grad[2] and bias is not None
    if dloss is None or not (need_h or need_w or need_b):
        return (None,) * 12
    dh, dw, db = torch.ops.foak.linear_cross_entropy_backward(
        dloss, hidden, weight, bias, labels, lse, *ctx.args, need_h, need_w, need_b, *ctx.epilogue
    )
    return (
        (dh if need_h else None),
        (dw if need_w else None),
        (db if need_b else None),
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


linear_cross_entropy_recompute.register_autograd(_recompute_backward, setup_context=_recompute_setup_context)


@torch.library.custom_op("foak::linear_cross_entropy_fused", mutates_args=())
def linear_cross_entropy_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    out_dtype: torch.dtype,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    logit_scale: float = 1.0,
    logit_divisor: float = 1.0,
    softcap: float = 0.0,
    round_epilogue: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, dhidden, dweight, dbias) for reduction mean/sum: the gradients of the loss
    (for an upstream gradient of 1), each an empty tensor unless asked for."""
    if reduction == "none":
        raise ValueError(
            "linear_cross_entropy_fused: reduction 'none' has one upstream gradient per "
            "row, unknown in the forward; use linear_cross_entropy_recompute"
        )
    h = _rows(hidden)
    _check(h.shape[0], labels, label_smoothing, reduction)
    epi = _check_lm_head(hidden, weight, bias, Epilogue(logit_scale, logit_divisor, softcap, round_epilogue))
    y = labels.reshape(-1)
    scale = _row_scale(torch.ones((), device=h.device), y, ignore_index, reduction)
    loss, lse, dh, dw, db = kernel.linear_cross_entropy_forward_backward(
        h, weight, bias, y, ignore_index, label_smoothing, scale, need_hidden, need_weight, need_bias, epi=epi
    )
    return (
        _reduce(loss, labels, ignore_index, reduction, out_dtype),
        lse.view(labels.shape),
        *_grads_or_empty(hidden, weight, dh, dw, db),
    )


@linear_cross_entropy_fused.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    ignore_index,
    label_smoothing,
    reduction,
    out_dtype,
    need_hidden,
    need_weight,
    need_bias,
    *epilogue,
):
    return (
        *_fake_outputs(hidden, labels, reduction, out_dtype),
        *_fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias),
    )


def _fused_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.computed = inputs[8:11]


def _fused_backward(ctx, dloss, *_):
    if torch.is_grad_enabled():
        raise RuntimeError("foak linear_cross_entropy: double backward (create_graph=True) is not supported")
    grads = []
    for g, needed, computed in zip(ctx.saved_tensors, ctx.needs_input_grad[:3], ctx.computed):
        if needed and not computed:  # cannot happen: the composite asks for what requires grad
            raise RuntimeError("foak linear_cross_entropy_fused: a gradient was not taken in the forward")
        # Only a scale: under inductor the saved gradient's buffer is donated and reused in place.
        grads.append(g * dloss if needed else None)
    return (*grads, *(None,) * 12)


linear_cross_entropy_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)
