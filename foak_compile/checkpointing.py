"""Activation-checkpoint regions: let Dynamo trace them whole, and say so when it cannot.

Dynamo records a `torch.utils.checkpoint` region as one higher-order op and refuses Python side effects
inside it, because eager checkpointing replays them when it recomputes the region in the backward.
transformers (>= 5.2x, through the `kernels` package it depends on) sets and resets a module-level
context variable inside every attention forward; under gradient checkpointing that refusal falls the
whole model back to eager and no decoder layer reaches the backend. Dynamo's
`skip_fwd_side_effects_in_bwd_under_checkpoint` lets the region trace: its Python side effects then
run once, in the forward, and are not replayed by the recompute. Tensor results are unchanged; a
set-then-reset pair like transformers' has no effect left to replay. foak turns it on when imported
(`backend="foak"` imports it), unless config.checkpoint_side_effects is off (`FOAK_CHECKPOINT_SIDE_EFFECTS=0`).
"""

import re
from collections import Counter

import torch

from . import config

_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def allow_side_effects_in_checkpoint_regions() -> bool:
    """Turn Dynamo's flag on unless opted out; True if it is on afterwards."""
    cfg = torch._dynamo.config
    if not hasattr(cfg, _FLAG):  # torch before the flag existed: regions with side effects break
        return False
    if config.current().checkpoint_side_effects:
        setattr(cfg, _FLAG, True)
    return side_effects_allowed()


def side_effects_allowed() -> bool:
    return bool(getattr(torch._dynamo.config, _FLAG, False))


# Graph breaks that drop a checkpoint region (or any higher-order op) out of the graph. Dynamo keys its
# graph-break counter by the break's text.
_REGION_BREAK = re.compile(r"^HOP:|checkpoint", re.IGNORECASE)
_seen: Counter = Counter()


def new_region_breaks() -> list:
    """Reasons of region graph breaks Dynamo recorded since the last call (each reason once)."""
    from torch._dynamo.utils import counters

    out = []
    for kind in ("graph_break", "unimplemented"):  # a break Dynamo recovered from / one that skipped the frame
        for key, n in list(counters[kind].items()):
            if n > _seen[kind, key] and _REGION_BREAK.search(key):
                out.append(_short(key))
            _seen[kind, key] = n
    return list(dict.fromkeys(out))


def _short(reason: str) -> str:
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    ctx = next((ln for ln in lines if ln.startswith("Developer debug context:")), "")
    return "; ".join(x for x in (lines[0] if lines else reason, ctx.replace("Developer debug context: ", "")) if x)
