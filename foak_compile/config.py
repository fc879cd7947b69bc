"""foak-compile's settings, in one object.

Every knob is a field of `Config`. The environment variables below are overrides of the defaults,
read in one place, `from_env()`. `current()` is the process-wide configuration in force: the
environment's, with what `configure(...)`, `patch(...)` or `use(...)` set on top. Each knob is read
where it is used, when it is used (`inline` and `ttir_cache` when the ops register, i.e. when
foak_compile is imported).

    FOAK_INLINE                   inline          0 / 1 / op-name prefixes (lora,rms_norm); unset: auto
    FOAK_TTIR_CACHE               ttir_cache      0: off (default on)
    FOAK_OPAQUE_DEQUANT           opaque_dequant  1 / 0: always / never; unset: with CUDA graphs
    FOAK_LCE_ONLINE               lce_online      1 / 0: always / never; unset: by size
    FOAK_CHECKPOINT_SIDE_EFFECTS  checkpoint_side_effects  0: leave Dynamo's flag alone (default on)
    FOAK_DUMP_DIR                 dump_dir        reports dumped under DIR (default: none)

    with foak_compile.config.patch(lce_online=False):   # for a scope (tests, benchmarks)
        ...
    foak_compile.config.configure(dump_dir="dumps")     # from now on
"""

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Union

Inline = Union[bool, frozenset[str], None]


@dataclasses.dataclass(frozen=True)
class Config:
    """Every foak-compile knob (see the module doc for the environment variables)."""

    inline: Inline = None
    """Register ops as triton_op, inlined into inductor: True all, False none, a frozenset of op-name prefixes
    ({"lora", "rms_norm"}); None: where Triton runs natively (CUDA, no interpreter). Read at registration."""
    ttir_cache: bool = True
    """Cache torch's TTIR access analysis of foak's kernels per signature (inlined ops' compile time)."""
    opaque_dequant: Optional[bool] = None
    """Quantised LoRA ops call the dequant as an opaque op: True always, False never, None: with cuda_graphs."""
    lce_online: Optional[bool] = None
    """lm_head + cross-entropy by the online-softmax path where it applies: True / False; None: by size."""
    checkpoint_side_effects: bool = True
    """Turn on Dynamo's skip_fwd_side_effects_in_bwd_under_checkpoint when foak_compile is imported."""
    dump_dir: Optional[str] = None
    """Dump every graph's report here (a backend's own dump_dir= comes first); None: no dumps."""
    cuda_graphs: bool = False
    """Set by the backend while it compiles for a CUDA-graphs mode (no environment variable)."""

    def __post_init__(self) -> None:
        if self.inline is not None and not isinstance(self.inline, (bool, frozenset)):
            object.__setattr__(self, "inline", frozenset(self.inline))  # any iterable of prefixes


def _switch(value: Optional[str]) -> Optional[bool]:
    """ "1" / "0": True / False; unset or anything else: None (automatic)."""
    return {"1": True, "0": False}.get(value or "")


def _inline(value: Optional[str]) -> Inline:
    if value is None or value in ("0", "1"):
        return None if value is None else value == "1"
    return frozenset(p.strip() for p in value.split(",") if p.strip())


def from_env(environ: Optional[Mapping[str, str]] = None) -> Config:
    """The defaults with the FOAK_* environment variables applied (the only place they are read)."""
    env = os.environ if environ is None else environ
    return Config(
        inline=_inline(env.get("FOAK_INLINE")),
        ttir_cache=env.get("FOAK_TTIR_CACHE", "1") != "0",
        opaque_dequant=_switch(env.get("FOAK_OPAQUE_DEQUANT")),
        lce_online=_switch(env.get("FOAK_LCE_ONLINE")),
        checkpoint_side_effects=env.get("FOAK_CHECKPOINT_SIDE_EFFECTS", "1") != "0",
        dump_dir=env.get("FOAK_DUMP_DIR") or None,
    )


_overrides: dict[str, Any] = {}  # fields set by configure / patch / use, over the environment's values


def current() -> Config:
    """The configuration in force: the environment's (read now), with what was set on top."""
    base = from_env()
    return dataclasses.replace(base, **_overrides) if _overrides else base


def configure(**changes: Any) -> Config:
    """Set knobs process-wide from now on (over the environment); returns the new current()."""
    global _overrides
    dataclasses.replace(Config(), **changes)  # unknown names raise TypeError
    _overrides = {**_overrides, **changes}
    return current()


def reset() -> None:
    """Drop everything configure / patch / use set: the environment's configuration again."""
    global _overrides
    _overrides = {}


@contextlib.contextmanager
def patch(**changes: Any) -> Iterator[Config]:
    """Within: these knobs changed (e.g. patch(lce_online=False)); yields the configuration in force.
    Restores what was set before on exit, a configure() inside included."""
    global _overrides
    dataclasses.replace(Config(), **changes)
    saved = _overrides
    _overrides = {**saved, **changes}
    try:
        yield current()
    finally:
        _overrides = saved


def use(config: Config) -> contextlib.AbstractContextManager[Config]:
    """Within: exactly `config`, whatever the environment says."""
    return patch(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
