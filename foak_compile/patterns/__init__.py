"""Pattern families, one module each. `PATTERNS` maps the names users pass to `backend(patterns=...)`,
in the order they run; `DEFAULT` is what runs when none are named: all of them."""

from .cross_entropy import CrossEntropyPattern, LinearCrossEntropyPattern
from .lora import LoraPattern
from .lora_siblings import LoraSiblingsPattern
from .lora_swiglu import LoraSwigluPattern
from .rms_norm import RMSNormPattern
from .rope import RopePattern

PATTERNS = {
    "lora": LoraPattern,  # first: takes whole layers, base linear included, before others claim a part
    "lora_siblings": LoraSiblingsPattern,  # then groups fused layers that share their input
    "lora_swiglu": LoraSwigluPattern,  # and fuses silu(gate) * up into a LoRA down projection
    "rms_norm": RMSNormPattern,
    "rope": RopePattern,
    # lm_head + loss first: once cross_entropy has taken the loss there is nothing left to fuse
    "linear_cross_entropy": LinearCrossEntropyPattern,
    "cross_entropy": CrossEntropyPattern,
}
DEFAULT = list(PATTERNS)
