"""foak-compile: a torch.compile backend that rewrites fine-tuning graphs into fused Triton kernels."""

__version__ = "0.2.0"  # the package's version (pyproject.toml reads it); CHANGELOG.md says what changed

from . import config  # noqa: F401  (foak_compile.config.current() / patch(...); see config.py)
from .config import Config
from . import ops  # noqa: F401  registers torch.ops.foak.*
from .checkpointing import allow_side_effects_in_checkpoint_regions
from .backend import FoakBackend, backend, foak
from .integrations import compile_for_trainer  # noqa: F401  (Trainer / TRL route; see integrations.py)
from .patterns import PATTERNS
from .report import GraphReport, reports, reset_reports, total_counts

__all__ = [
    "backend",
    "foak",
    "Config",
    "FoakBackend",
    "GraphReport",
    "PATTERNS",
    "reports",
    "reset_reports",
    "total_counts",
]

# gradient-checkpointed decoder layers must reach the backend whole (see checkpointing.py)
allow_side_effects_in_checkpoint_regions()
