"""torch.ops.foak.*: each fused op is defined once as a torch custom op with a fake (meta)
implementation and an autograd formula, so Dynamo, AOTAutograd and inductor see one opaque
node in forward and one in backward. Importing this package registers them all.

It is also all that patterns know of the ops besides their names: the dtypes the kernels take
(SUPPORTED_DTYPES), the LoRA ops' argument layouts (lora_schema) and the quantisation formats
they accept (lora.BNB4_BLOCKSIZES, lora_gptq.bit_widths); patterns import nothing from kernels/.
"""

from ..kernels.common import TL_DTYPE
from . import cross_entropy  # noqa: F401
from . import dequant  # noqa: F401
from . import lora  # noqa: F401
from . import lora_gptq  # noqa: F401
from . import lora_schema
from . import lora_siblings  # noqa: F401
from . import lora_swiglu  # noqa: F401
from . import rms_norm  # noqa: F401
from . import rope  # noqa: F401

# The floating dtypes every foak kernel reads and writes (the keys of the kernels' torch → Triton map).
SUPPORTED_DTYPES = frozenset(TL_DTYPE)

lora_schema.check_registered()  # an op whose signature drifted from its declared layout fails here, at import
