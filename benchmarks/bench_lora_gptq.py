"""LoRA over a GPTQ base, forward+backward on a GPU, per projection shape of Llama-3.2-1B and
Llama-3.1-8B: eager peft on gptqmodel (GPTQLoraLinear over TorchLinear in training mode, whose
dequantisation gptqmodel itself wraps in torch.compile) vs inductor (torch.compile of that peft
layer) vs foak (torch.ops.foak.lora_linear_gptq called directly, and the peft layer compiled with
the foak backend). 4-bit, group size 128, symmetric, bf16 activations, fp16 scales, as GPTQ
checkpoints ship; --act-order adds act-order (desc_act) layers.

    PYTHONPATH=$PWD python -m benchmarks.bench_lora_gptq --out $OUT/lora_gptq.json

Needs gptqmodel + optimum (scripts/install_gptq.sh; on a machine without an index carry the
wheels it builds with --wheels). Times are medians of CUDA-event-timed fwd+bwd steps (x requires
grad; lora_A/lora_B trained, the base frozen); peak memory is the step's high-water mark above
what was allocated before it. quantize_linears() turns any model's nn.Linear layers into packed
gptqmodel layers (for the train-step benchmark).
"""

import argparse
import os
import traceback

import torch
import torch.nn as nn

import foak_compile
from foak_compile.kernels import gptq

# the same shapes, rank and timing/memory/accuracy harness as the dense/NF4 benchmark
from .bench_lora import ALPHA, DTYPE, RANK, SHAPES, TOKENS, measure_variants
from .common import bench_ms, environment, write_json

BITS = 4
GROUP_SIZE = 128


def _gptqmodel():
    try:
        os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")  # no JIT C++ build for the CPU packer
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
        import gptqmodel

        return TorchLinear, gptqmodel.__version__, None
    except Exception as err:  # missing, or it does not import on this machine
        return None, None, f"gptqmodel unavailable: {err!r}"


def _rtn_grid(w: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool):
    """Round-to-nearest scales/zeros [out, groups] and g_idx of `w` [out, in]: the packed format
    is what is measured; GPTQ's error-correcting rounding would give the same tensors' shapes."""
    out_f, in_f = w.shape
    maxq = 2**bits - 1
    gs = in_f if group_size == -1 else group_size
    g_idx = torch.arange(in_f, device=w.device) // gs
    if act_order:  # a permuted column order, as desc_act checkpoints have
        g_idx = g_idx[torch.randperm(in_f, device=w.device)]
    groups = int(g_idx.max()) + 1
    wf = w.float()
    lo = torch.full((out_f, groups), float("inf"), device=w.device).scatter_reduce(
        1, g_idx.expand(out_f, -1), wf, "amin"
    )
    hi = torch.full((out_f, groups), float("-inf"), device=w.device).scatter_reduce(
        1, g_idx.expand(out_f, -1), wf, "amax"
    )
    if sym:
        scale = (torch.maximum(lo.abs(), hi.abs()) * 2 / maxq).clamp_min(1e-8)
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = ((hi - lo) / maxq).clamp_min(1e-8)
        zero = (-lo / scale).round().clamp(0, maxq)
    return scale.half().float(), zero, g_idx.int()


def gptq_linear(linear: nn.Linear, bits=BITS, group_size=GROUP_SIZE, sym=True, act_order=False, device="cuda"):
    """A gptqmodel TorchLinear packed by gptqmodel's own packer from `linear`'s weight."""
    TorchLinear, _, why = _gptqmodel()
    if TorchLinear is None:
        raise RuntimeError(why)
    scale, zero, g_idx = _rtn_grid(linear.weight.detach().to(device), bits, group_size, sym, act_order)
    m = TorchLinear(
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=act_order,
        in_features=linear.in_features,
        out_features=linear.out_features,
        bias=linear.bias is not None,
        pack_dtype=torch.int32,
    )
    packed = False
    if torch.device(device).type == "cuda" and hasattr(m, "pack_gpu"):
        try:  # gptqmodel's CUDA packer: seconds instead of minutes for a whole model
            m.pack_gpu(linear, scale, zero, g_idx, device=device)
            packed = True
        except Exception as err:  # fall back to its CPU packer, same layout
            print(f"pack_gpu failed ({err!r}); packing on the CPU")
    if not packed:
        m.pack(linear.cpu(), scale.cpu(), zero.cpu(), g_idx.cpu())
    for name, buf in list(m._buffers.items()):  # packed under inference_mode; loaded checkpoints are not
        if buf is not None:
            m._buffers[name] = buf.clone() if buf.is_inference() else buf
    m = m.to(device)
    m.post_init()
    return m.train()


def quantize_linears(
    model: nn.Module, bits=BITS, group_size=GROUP_SIZE, sym=True, act_order=False, skip=("lm_head",)
) -> nn.Module:
    """Every nn.Linear of `model` but `skip` → a packed gptqmodel TorchLinear, in place; sets the
    attributes peft reads to dispatch its GPTQ LoRA layer."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and name not in skip:
                setattr(mod, name, gptq_linear(child, bits, group_size, sym, act_order, child.weight.device))
                del child
    torch.cuda.empty_cache()
    return model


class Holder(nn.Module):
    """One projection for peft to wrap."""

    def __init__(self, base):
        super().__init__()
        self.proj = base
        # a GPTQ layer holds only buffers; peft reads the model's first parameter (StopIteration
        # without one), so the holder carries a frozen one-element anchor
        self.anchor = nn.Parameter(torch.zeros(1, device="cuda", dtype=DTYPE), requires_grad=False)

    def forward(self, x):
        return self.proj(x)


def peft_layer(in_f, out_f, act_order, adapter_dtype):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=DTYPE)
    holder = Holder(gptq_linear(dense, act_order=act_order))
    del dense
    model = get_peft_model(
        holder,
        LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"]),
        autocast_adapter_dtype=(adapter_dtype == torch.float32),
    )
    assert type(model.base_model.model.proj).__name__ == "GPTQLoraLinear", type(model.base_model.model.proj)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn_like(p, dtype=adapter_dtype) * 0.02  # non-zero B: the adapter really runs
    return model.train()


def foak_op(model):
    """x -> y through torch.ops.foak.lora_linear_gptq on the peft layer's tensors."""
    layer = model.base_model.model.proj
    base = layer.base_layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    return lambda x: torch.ops.foak.lora_linear_gptq(
        x, base.qweight, base.qzeros, base.scales, base.g_idx, None, a, b, s, 0.0, base.bits, 2, DTYPE, DTYPE
    )[0]


def run_case(in_f, out_f, act_order, adapter_dtype):
    model = peft_layer(in_f, out_f, act_order, adapter_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(TOKENS, in_f, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn(TOKENS, out_f, device="cuda", dtype=DTYPE)
    be = foak_compile.backend(inner="inductor")
    variants = {  # one set of weights for all
        "eager_peft": model,
        "inductor": torch.compile(model),
        "foak_op": foak_op(model),
        "foak_backend": torch.compile(model, backend=be),
    }
    return measure_variants(variants, model, x, dy, params, in_f, out_f, be)


def dequant_case(in_f, out_f, act_order):
    """The dequantisation alone: foak's Triton kernel vs gptqmodel's TorchLinear.dequantize_weight
    (its torch ops, compiled by gptqmodel with inductor), ms and GB/s (packed read + bf16 written)."""
    torch.manual_seed(0)
    m = gptq_linear(nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=DTYPE), act_order=act_order)
    ours = lambda: gptq.dequantize(m.qweight, m.qzeros, m.scales, m.g_idx, m.bits, DTYPE)  # noqa: E731
    theirs = lambda: m.dequantize_weight().to(DTYPE)  # noqa: E731
    out = {"bit_exact_vs_gptqmodel": bool(torch.equal(ours(), theirs()))}
    nbytes = out_f * in_f * (2 + BITS / 8)
    for name, fn in (("foak", ours), ("gptqmodel", theirs)):
        ms = bench_ms(fn)
        out[name] = {"ms": round(ms, 4), "gbs": round(nbytes / ms / 1e6, 1)}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/lora_gptq.json")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--act-order", action="store_true", help="also time act-order (desc_act) layers")
    p.add_argument(
        "--fp32-adapters",
        action="store_true",
        help="also time peft's default on a bf16 base: fp32 adapters (the op runs them in bf16)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_lora_gptq needs a CUDA GPU")
    TorchLinear, version, why = _gptqmodel()
    res = {
        "env": environment(),
        "tokens": TOKENS,
        "rank": RANK,
        "alpha": ALPHA,
        "dtype": "bfloat16",
        "gptq": why or f"gptqmodel {version} TorchLinear, {BITS}-bit, group size {GROUP_SIZE}, sym, fp16 scales",
        "cases": {},
    }
    if why:
        write_json(args.out, res)
        raise SystemExit(why)
    res["env"]["gptqmodel"] = version
    orders = [False] + ([True] if args.act_order else [])
    adapter_dtypes = [torch.bfloat16] + ([torch.float32] if args.fp32_adapters else [])
    for name in args.shapes:
        in_f, out_f = SHAPES[name]
        case = res["cases"][name] = {}
        for act_order in orders:
            for adt in adapter_dtypes:
                tag = f"gptq{' act-order' if act_order else ''}, {'bf16' if adt == torch.bfloat16 else 'fp32'} adapters"
                try:
                    case[tag] = run_case(in_f, out_f, act_order, adt)
                except Exception as err:
                    case[tag] = {"error": repr(err), "trace": traceback.format_exc(limit=5)}
                write_json(args.out, res)  # partial results survive a later failure
                torch._dynamo.reset()
            try:
                case[f"dequant only{' act-order' if act_order else ''}"] = dequant_case(in_f, out_f, act_order)
            except Exception as err:
                case[f"dequant only{' act-order' if act_order else ''}"] = {"error": repr(err)}
            write_json(args.out, res)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
