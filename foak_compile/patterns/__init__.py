"""Pattern families, one module each. `PATTERNS` maps the names users pass to `backend(patterns=...)`."""
from .rms_norm import RMSNormPattern

PATTERNS = {
    "rms_norm": RMSNormPattern,
}
