"""How a foak op is registered, decided once per process.

Where Triton runs natively (CUDA, no interpreter) an op is a `torch.library.triton_op`: still
`torch.ops.foak.<name>` with its autograd formula, but AOTAutograd traces its body, so inductor
sees the aten ops and Triton kernels inside (launched with `wrap_triton`) and calls them from its
generated code. An opaque custom op cost ~100-300 µs of Python dispatch per call, which made the
1B LoRA train step host-bound (GPU busy 36 % of the step, docs/decisions.md); that was measured
before `direct_launches` (below) took its launches off torch's higher-order-op path, not since.

Under the Triton interpreter (CI) or without CUDA an op is an opaque `torch.library.custom_op`
with an explicit fake: the interpreter runs kernels on real CPU memory, so their bodies cannot
be traced with fake tensors. config.inline (FOAK_INLINE=0/1, or a list of op prefixes, e.g. lora,rms_norm)
overrides the choice; benchmarks compare them.

Inlined ops cost compile time: for every `wrap_triton` launch it traces, torch asks Triton for the
kernel's TTIR to find which arguments it writes (once when AOTAutograd functionalises it, again
when inductor lowers it). A 16-layer model launches the same few kernels with the same arguments
hundreds of times, so `_memoize_access_analysis` caches that answer for foak's kernels per kernel
and argument signature (config.ttir_cache; FOAK_TTIR_CACHE=0 turns it off).
"""

import copy
import functools
from typing import Union

import torch

from .. import config
from ..kernels.common import INTERPRET


def _inline() -> Union[bool, frozenset[str]]:
    """True (all ops), False, or a set of op-name prefixes: config.inline, or where Triton runs natively."""
    forced = config.current().inline
    if forced is not None:
        return forced
    return hasattr(torch.library, "triton_op") and not INTERPRET and torch.cuda.is_available()


INLINE = _inline()  # decided once, as the ops register (importing foak_compile)
_inlined: set = set()  # names of the ops registered as triton_op


def _is_ours(kernel) -> bool:
    """Only foak's own kernels are cached (an Autotuner or JITFunction wraps the Python function)."""
    fn = kernel
    for _ in range(3):
        if getattr(fn, "__module__", "").startswith("foak_compile."):
            return True
        fn = getattr(fn, "fn", None)
        if fn is None:
            return False
    return False


def _access_key(kernel, kwargs, tma):
    """A hashable stand-in for what Triton's TTIR (and so the read/write sets) depends on: the
    kernel, each argument's dtype if a tensor (fake, real or inductor's buffer), else its value.
    None when an argument is of a kind not understood (then nothing is cached)."""
    if tma or not _is_ours(kernel):
        return None
    key = [kernel]  # the object, not its id: a freed kernel's address may be reused
    for name in sorted(kwargs):
        v = kwargs[name]
        if isinstance(v, (bool, int, float, str, type(None))):
            key.append((name, type(v).__name__, v))
        elif isinstance(v, torch.SymInt) or type(v).__module__.startswith("sympy"):
            key.append((name, "sym", str(v)))
        elif hasattr(v, "get_dtype"):  # inductor TensorBox / buffer
            key.append((name, "tensor", v.get_dtype()))
        elif isinstance(v, torch.Tensor):
            key.append((name, "tensor", v.dtype))
        elif hasattr(v, "value") and isinstance(v.value, (bool, int, float)):  # tl.constexpr
            key.append((name, "constexpr", v.value))
        else:
            return None
    return tuple(key)


def _memoize_access_analysis() -> None:
    """Wrap torch's kernel access analysis in a per-signature cache (see the module doc). It is
    `identify_accessed_tensors` in newer torch and `identify_mutated_tensors` (a list of names)
    before; both take (kernel, kwargs, tma_descriptor_metadata)."""
    if not config.current().ttir_cache:
        return
    try:
        from torch._higher_order_ops import triton_kernel_wrap as tkw
    except ImportError:  # another torch: compile as it does
        return
    for fn_name in ("identify_accessed_tensors", "identify_mutated_tensors"):
        original = getattr(tkw, fn_name, None)
        if original is None or getattr(original, "_foak_cached", False):
            continue
        setattr(tkw, fn_name, _cached(original))


def _cached(original):
    cache: dict = {}

    @functools.wraps(original)
    def cached(kernel, kwargs, tma_descriptor_metadata, *rest):
        key = _access_key(kernel, kwargs, tma_descriptor_metadata) if not rest else None
        if key is None:
            return original(kernel, kwargs, tma_descriptor_metadata, *rest)
        if key not in cache:
            cache[key] = original(kernel, kwargs, tma_descriptor_metadata)
        return copy.deepcopy(cache[key])  # callers get their own (mutable) result

    cached._foak_cached = True
    return cached


if INLINE:
    _memoize_access_analysis()


try:
    from torch._library.triton import set_wrap_triton_enabled as _wrap_triton_enabled
except ImportError:  # older torch: wrap_triton launches directly when not tracing
    _wrap_triton_enabled = None


def direct_launches(fn):
    """`fn` with its `wrap_triton` launches made as plain Triton launches. Called eagerly (the body
    of an opaque op at run time), a `wrap_triton` launch otherwise goes through torch's
    higher-order-op dispatch, ~1 ms per launch by torch's own comment, where a launch is ~20 µs;
    triton_op does this for its eager calls, custom_op does not."""
    if _wrap_triton_enabled is None:
        return fn

    @functools.wraps(fn)  # custom_op reads the schema from the wrapped signature
    def direct(*args, **kwargs):
        with _wrap_triton_enabled(False):
            return fn(*args, **kwargs)

    return direct


def fused_op(name: str, seeded: bool = False, inline: bool = True):
    """Decorator registering `fn` as torch.ops.<name>. seeded: draws random numbers (the opaque
    op is tagged nondeterministic_seeded: torch treats it as advancing the RNG, so fake tensors do not
    constant-fold it and it counts as impure; the joint graph's CSE does not read the tag, see
    ops/dequant.py; inlined, its randint node says so).
    inline=False keeps an op opaque everywhere (its body is not traceable yet)."""

    def register(fn):
        short = name.split("::")[-1]
        wanted = INLINE if isinstance(INLINE, bool) else any(short.startswith(f) for f in INLINE)
        if wanted and inline:
            _inlined.add(name)
            return torch.library.triton_op(name, fn, mutates_args=())
        tags = (torch.Tag.nondeterministic_seeded,) if seeded else ()
        return torch.library.custom_op(name, direct_launches(fn), mutates_args=(), tags=tags)

    return register


def is_inlined(name: str) -> bool:
    return name in _inlined


def register_fake(op, fake) -> None:
    """The fake (meta) implementation of an opaque op; an inlined op derives it from its body."""
    if op._qualname not in _inlined:
        op.register_fake(fake)
