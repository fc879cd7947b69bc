"""torch.ops.foak.*: each fused op is defined once as a torch custom op with a fake (meta)
implementation and an autograd formula, so Dynamo, AOTAutograd and inductor see one opaque
node in forward and one in backward. Importing this package registers them all."""
from . import cross_entropy  # noqa: F401
from . import dequant  # noqa: F401
from . import lora  # noqa: F401
from . import lora_gptq  # noqa: F401
from . import lora_siblings  # noqa: F401
from . import lora_swiglu  # noqa: F401
from . import rms_norm  # noqa: F401
from . import rope  # noqa: F401
