"""Pattern families, one module each. `PATTERNS` maps the names users pass to `backend(patterns=...)`."""
from .cross_entropy import CrossEntropyPattern, LinearCrossEntropyPattern
from .lora import LoraPattern
from .rms_norm import RMSNormPattern
from .rope import RopePattern

PATTERNS = {
    "lora": LoraPattern,  # first: takes whole layers, base linear included, before others claim a part
    "rms_norm": RMSNormPattern,
    "rope": RopePattern,
    # lm_head + loss first: once cross_entropy has taken the loss there is nothing left to fuse
    "linear_cross_entropy": LinearCrossEntropyPattern,
    "cross_entropy": CrossEntropyPattern,
}
