"""densemoe: the MoE layer for NVIDIA Hopper, as dense GEMMs over all experts with per-token,
per-expert scales, skipping the experts a batch did not pick.

Public API: the ops ``fc1`` / ``fc2`` and their config types, the routed experts
(``experts_forward``, ``prepare_weights``), the layer (``DenseMoE``), the integrations
(``fused_experts`` for serving engines, ``register_hf`` for transformers), ``tune`` and
``reference`` (the float64 twins that define the semantics). The layout of the package:
``docs/architecture.md``.
"""

from densemoe import _interpreter

_interpreter.install()  # Triton's interpreter (TRITON_INTERPRET=1): its fixes, before any kernel runs

from densemoe import reference, routing  # noqa: E402
from densemoe._version import __version__  # noqa: E402
from densemoe.experts import experts_forward, experts_stages  # noqa: E402
from densemoe.integrations import _hf_hook  # noqa: E402
from densemoe.integrations.hf import register_hf  # noqa: E402
from densemoe.integrations.checkpoint import load_moe_layer  # noqa: E402
from densemoe.integrations.serving import fused_experts  # noqa: E402
from densemoe.kernels.common import Fc1Problem, Fc2Problem  # noqa: E402
from densemoe.kernels.cute.fc1_sm90 import Fc1CuteConfig  # noqa: E402
from densemoe.kernels.cute.fc2_sm90 import Fc2CuteConfig  # noqa: E402
from densemoe.kernels.triton.fc1 import Fc1TritonConfig  # noqa: E402
from densemoe.kernels.triton.fc2 import Fc2TritonConfig  # noqa: E402
from densemoe.layer import DenseMoE  # noqa: E402
from densemoe.ops.fc1 import fc1  # noqa: E402
from densemoe.ops.fc2 import fc2  # noqa: E402
from densemoe.tuning.tuner import tune  # noqa: E402  (also installs the autotune-on-miss hook)
from densemoe.weights import PreparedWeights, prepare_weights  # noqa: E402

_hf_hook.install()  # experts_implementation="densemoe" in transformers, no import of it here

__all__ = ["fc1", "fc2", "DenseMoE", "fused_experts", "load_moe_layer", "experts_forward", "experts_stages", "prepare_weights", "PreparedWeights",
           "register_hf", "tune", "reference", "routing", "Fc2Problem", "Fc2TritonConfig", "Fc2CuteConfig",
           "Fc1Problem", "Fc1TritonConfig", "Fc1CuteConfig", "__version__"]
